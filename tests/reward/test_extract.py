import time

from hypothesis import given, settings
from hypothesis import strategies as st

from sapo_ray.reward.extract import last_boxed


def test_simple_and_nested():
    assert last_boxed(r"so \boxed{42}.") == "42"
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{ {a}{b{c}} }") == " {a}{b{c}} "
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed {5}") == "5"


def test_last_box_wins():
    assert last_boxed(r"\boxed{1} then \fbox{2} then \boxed{3} end") == "3"
    assert last_boxed(r"\boxed{1} then \fbox{2}") == "2"
    assert last_boxed(r"\boxed{\boxed{1}}") == "1"  # the box that starts last


def test_escaped_braces_do_not_nest():
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{\left\{ x \right.}") == r"\left\{ x \right."


def test_absent_or_unbalanced():
    for text in ["", None, 3, "no box here", r"\boxed 5", r"\boxed{1", r"\boxed{1} \boxed{{2}", r"\boxed{"]:
        assert last_boxed(text) is None, text
    assert last_boxed(r"\boxed{}") == ""


def test_junk_and_bytes():
    assert last_boxed("\udcff\x00\ud800 \\boxed{\udcff}") == "\udcff"
    assert last_boxed(b"\xff\xfe \\boxed{9}") == "9"
    assert last_boxed("}}}}{{{{") is None


def test_huge_inputs_are_fast():
    start = time.perf_counter()
    assert last_boxed("x" * 5_000_000 + r"\boxed{ok}") == "ok"
    assert last_boxed(r"\boxed{" + "{" * 1_000_000 + "}" * 1_000_000 + "}") == "{" * 1_000_000 + "}" * 1_000_000
    assert last_boxed(r"\boxed{" * 700_000) is None
    assert last_boxed(r"\boxed{a}" + "{" * 5_000_000) == "a"
    assert time.perf_counter() - start < 5


no_braces = st.text(st.characters(blacklist_characters="{}\\"), max_size=50)


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=50), content=no_braces, suffix=no_braces)
def test_property_box_content_comes_back(prefix, content, suffix):
    assert last_boxed(f"{prefix}\\boxed{{{{{content}}}}}{suffix}") == "{" + content + "}"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("{}\\boxedfx \udcff")), max_size=80))
def test_property_never_raises_and_returns_a_substring(text):
    found = last_boxed(text)
    assert found is None or found in text
