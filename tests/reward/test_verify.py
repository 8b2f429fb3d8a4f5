import pytest

from sapo_ray.reward.verify import is_equivalent, plain


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"2\sqrt{221}", r"\sqrt{884}"),
        (r"60^\circ", "60"),
        (r"\dfrac{40}{3}", r"\frac{40}{3}"),
        ("x = 3", "3"),
    ],
)
def test_equivalent(prediction, gold):
    assert is_equivalent(prediction, gold)


@pytest.mark.parametrize("prediction, gold", [("13.33", r"\frac{40}{3}"), ("2", "3"), ("", "1"), (r"\sqrt{2}", "1.41")])
def test_not_equivalent(prediction, gold):
    assert not is_equivalent(prediction, gold)


def test_plain():
    assert plain(r" $12 \, cm$. ") == "12cm"
    assert plain(r"\left( 1, 2 \right)") == "(1,2)"
