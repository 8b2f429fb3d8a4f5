"""`python -m sapo_ray.inspect`: the page's data from a hand-written dump of two steps (a SAPO step with a
two-turn tool episode and a sample of HTML-like tokens, a GRPO step without critic or segments), and the
page itself in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sapo_ray.inspect import call_mask, main, run_labels, script_json, token_classes, turns, view

# A two-turn episode: a tool call whose opening tag is split over two tokens, the tool's response, the answer.
EPISODE = {
    "tokens": ["<tool", "_call>", '{"name": "calculator", ', '"arguments": {"expression": "3 + 4"}}', "</tool_call>",
               "\n<tool_response>\n", "7", "\n</tool_response>\n", "The", " answer", " is", " 7", "."],
    "observation": [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0],
    "entropy": [0.5, 0.1, 1.25, 0.75, 0.05, 0, 0, 0, 2.0, 0.25, 0.3, 0.125, 0.01],
    "advantages": [0.5, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, -1.5, -1.5, -1.5, 0.75, 0.75],
    "values": [0.2, 0.21, 0.22, 0.23, 0.24, 0.3, 0.3, 0.3, 0.4, 0.41, 0.42, 0.6, 0.61],
    "anchors": [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0],
    "returns": [0.7, 0.7, 0.7, 0.7, 0.7, 0, 0, 0, 0.9, 0.9, 0.9, 1.0, 1.0],
    "seg_end": [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    "log_ratio": [0.01, 0.01, 0.01, 0.01, 0.01, 0, 0, 0, -0.02, -0.02, -0.02, 0.003, 0.003],
    "clipped": [0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
}
# Tokens that are markup, and a script's end.
MARKUP = ["<think>", "</script>", '<b>&"', " <!--", " x", "</think>"]


def record(step, algorithm, row, pid, acc, tokens, **fields):
    n = len(tokens)
    critic = algorithm == "sapo"
    base = {"step": step, "algorithm": algorithm, "segmenter": "entropy" if critic else None,
            "ratio_level": "segment" if critic else "token", "row": row, "group": row // 2, "pid": pid,
            "prompt": f"How many bars? <i>What</i> & \"why\" ({pid})", "answer": "7", "score": acc, "acc": acc,
            "format": 1.0, "images": [], "tokens": tokens, "observation": [0] * n, "entropy": [0.5] * n,
            "advantages": [acc - 0.5] * n, "values": [0.1] * n if critic else None,
            "anchors": [1] + [0] * (n - 1) if critic else None, "returns": [acc] * n if critic else None,
            "seg_end": [0] * (n - 1) + [1] if critic else None, "log_ratio": [0.0] * n, "clipped": [0] * n,
            "episode": None}
    return {**base, **fields}


FIXTURE = {
    1: [record(1, "sapo", 0, "bar-1", 1.0, images=["images/chart.png"],
               episode={"turns": 2, "tool_calls": 1, "tool_errors": {"malformed": 1}, "cut": False}, **EPISODE),
        record(1, "sapo", 1, "markup-1", 0.0, MARKUP, clipped=[0, 0, 0, 1, 0, 0])],
    # Written out of row order: the page takes the first rows.
    2: [record(2, "grpo", 1, "plain-2", 0.0, ["No", "."]),
        record(2, "grpo", 0, "bar-1", 1.0, ["Seven", "."], images=["images/chart.png"])],
}


@pytest.fixture
def run_dir(tmp_path):
    gen = tmp_path / "sapo-seed0" / "generations"
    (gen / "images").mkdir(parents=True)
    Image.new("RGB", (4, 3), (200, 30, 30)).save(gen / "images" / "chart.png")
    for step, records in FIXTURE.items():
        (gen / f"experience_step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "sapo-seed0"


def embedded(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def at(classes: list[str], name: str) -> list[int]:
    return [i for i, c in enumerate(classes) if name in c.split()]


def test_turns_are_the_runs_of_model_and_observation_tokens():
    assert turns(EPISODE["observation"]) == [("turn", 0, 5), ("obs", 5, 8), ("turn", 8, 13)]
    assert turns([1, 0]) == [("obs", 0, 1), ("turn", 1, 2)]
    assert turns([]) == []


def test_tool_calls_are_found_across_tokens_and_end_with_their_turn():
    assert at(["call" if c else "" for c in call_mask(EPISODE["tokens"], EPISODE["observation"])], "call") == [0, 1, 2, 3, 4]
    # An unclosed call stops at the observation; the next turn's `</tool_call>` opens nothing.
    tokens = ["Let me", " <tool_call>", "{...", "<tool_response>", "</tool_call>", " done"]
    assert call_mask(tokens, [0, 0, 0, 1, 0, 0]) == [False, True, True, False, False, False]
    assert call_mask(["a", "", "<tool_call>x</tool_call>", ""], [0] * 4) == [False, False, True, False]


def test_token_classes_mark_each_field():
    classes = token_classes(FIXTURE[1][0])
    assert len(classes) == 13
    assert at(classes, "obs") == [5, 6, 7]
    assert at(classes, "clipped") == [2, 9]
    assert at(classes, "seg-end") == [4, 10, 12]
    assert at(classes, "anchor") == [0, 8, 11]
    assert at(classes, "call") == [0, 1, 2, 3, 4]
    assert classes[2] == "clipped call" and classes[12] == "seg-end"
    # No critic, no segments: only the loss's clip can be marked.
    assert token_classes(FIXTURE[2][0]) == ["", ""]


def test_view_rounds_numbers_and_keeps_non_finite_ones_as_text():
    r = view({**FIXTURE[2][0], "entropy": [0.123456789, 1e-7], "log_ratio": [float("nan"), float("inf")]}, "run")
    assert r["entropy"] == [0.1235, 1e-7] and r["log_ratio"] == ["nan", "inf"]
    assert r["run"] == "run" and r["parts"] == [("turn", 0, 2)]
    json.dumps(r, allow_nan=False)


def test_script_json_cannot_end_its_element():
    data = {"tokens": ["</script>", "<!--", "</SCRIPT >", '<b>&"']}
    text = script_json(data)
    assert "<" not in text and json.loads(text) == data


def test_page_embeds_records_and_each_image_once(run_dir):
    out = main([str(run_dir)])
    assert out == run_dir / "inspect.html"
    page = out.read_text()
    data = embedded(page)
    assert [(r["step"], r["row"], r["pid"]) for r in data["records"]] == [(1, 0, "bar-1"), (1, 1, "markup-1"), (2, 0, "bar-1"),
                                                                          (2, 1, "plain-2")]
    png = base64.b64encode((run_dir / "generations/images/chart.png").read_bytes()).decode()
    assert data["images"] == {"sapo-seed0/images/chart.png": f"data:image/png;base64,{png}"}
    assert page.count(png) == 1
    # The markup tokens are inside the JSON, escaped: the page has its two scripts' ends and no raw token.
    assert page.count("</script>") == 2 and '<b>&"' not in page and "<!--" not in page
    assert data["records"][1]["tokens"] == MARKUP
    assert data["entropy_scale"] == 1.25  # the 98th percentile of the model tokens' entropies
    assert "<title>sapo-ray inspect: sapo-seed0</title>" in page


def test_steps_and_samples_per_step_bound_the_page(run_dir, tmp_path):
    out = main([str(run_dir), "--steps", "2", "--max-samples-per-step", "1", "--out", str(tmp_path / "p.html")])
    assert [(r["step"], r["row"]) for r in embedded(out.read_text())["records"]] == [(2, 0)]


def test_runs_are_labelled_by_name_or_by_path_when_names_repeat(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "grpo-seed0")
    data = embedded(main([str(run_dir), str(tmp_path / "grpo-seed0")]).read_text())
    assert [r["run"] for r in data["records"]] == ["sapo-seed0"] * 4 + ["grpo-seed0"] * 4
    assert sorted(data["images"]) == ["grpo-seed0/images/chart.png", "sapo-seed0/images/chart.png"]
    same_names = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    assert run_labels(same_names) == [str(d) for d in same_names]


def test_missing_dumps_name_the_directory_and_the_option(tmp_path):
    (tmp_path / "run" / "generations").mkdir(parents=True)
    for args in ([str(tmp_path / "run")], [str(tmp_path / "absent")]):
        with pytest.raises(SystemExit, match=r"trainer\.dump_rollouts=true") as e:
            main(args)
        assert args[0] in str(e.value)


def test_bad_steps_and_lines_are_named(run_dir, capsys):
    with pytest.raises(SystemExit, match=r"step\(s\) 7 .*\(dumped: 1, 2\)"):
        main([str(run_dir), "--steps", "2,7"])
    with pytest.raises(SystemExit) as e:
        main([str(run_dir), "--steps", "two"])
    assert e.value.code == 2 and "steps are comma-separated integers, got 'two'" in capsys.readouterr().err
    path = run_dir / "generations" / "experience_step_000002.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(SystemExit, match=r"experience_step_000002\.jsonl:3: not a JSON record"):
        main([str(run_dir)])
    path.write_text(json.dumps({k: v for k, v in FIXTURE[2][0].items() if k != "observation"}) + "\n")
    with pytest.raises(SystemExit, match=r":1: no observation in the record"):
        main([str(run_dir)])
    path.write_text(json.dumps({**FIXTURE[2][0], "entropy": [0.5]}) + "\n")
    with pytest.raises(SystemExit, match=r":1: entropy not one value per token \(2 tokens\)"):
        main([str(run_dir)])


CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run"]


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's package `chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (requirements/cpu.txt)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_page_in_chromium(run_dir, browser):
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(main([str(run_dir)]).as_uri())
    assert errors == []
    shown = lambda: page.eval_on_selector_all("section.sample", "ss => ss.map(s => [+s.dataset.step, s.dataset.pid])")
    assert shown() == [[1, "bar-1"], [1, "markup-1"], [2, "bar-1"], [2, "plain-2"]]

    sample = page.locator('section.sample[data-step="1"][data-pid="bar-1"]')
    assert sample.get_attribute("data-algorithm") == "sapo" and sample.get_attribute("data-acc") == "1"
    spans = sample.locator("span.tok")
    assert spans.all_text_contents() == EPISODE["tokens"]
    assert spans.evaluate_all("ss => ss.map(s => +s.dataset.i)") == list(range(13))
    marked = lambda cls: spans.evaluate_all(f"ss => ss.filter(s => s.classList.contains('{cls}')).map(s => +s.dataset.i)")
    assert marked("obs") == [5, 6, 7] and marked("clipped") == [2, 9] and marked("call") == [0, 1, 2, 3, 4]
    assert marked("seg-end") == [4, 10, 12] and marked("anchor") == [0, 8, 11]
    title = spans.nth(9).get_attribute("title")
    assert "entropy 0.25" in title and "advantage -1.5" in title and "value 0.41" in title and "log_ratio -0.02" in title
    assert sample.locator("sup.value").all_text_contents() == ["0.2", "0.4", "0.6"]
    assert sample.locator(".turn").count() == 2 and sample.locator(".obs-run span.tok").count() == 3
    assert sample.locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [4, 3]

    markup = page.locator('section.sample[data-pid="markup-1"]')
    assert markup.locator("span.tok").all_text_contents() == MARKUP
    # The text's tags stay text: the prompt holds only the page's own label, the response only tokens.
    assert markup.locator(".prompt *").all_text_contents() == ["prompt "]
    assert markup.locator(".response *:not(.turn, .obs-run, .label, .tok, .value)").count() == 0
    assert "<i>What</i> & \"why\"" in markup.locator(".prompt").text_content()

    page.select_option("#reward", "right")
    assert shown() == [[1, "bar-1"], [2, "bar-1"]]
    page.select_option("#reward", "")
    page.select_option("#step", "2")
    assert shown() == [[2, "bar-1"], [2, "plain-2"]]
    page.select_option("#step", "")
    page.select_option("#algorithm", "sapo")
    page.select_option("#reward", "wrong")
    assert shown() == [[1, "markup-1"]] and page.text_content("#count") == "1 of 4 samples"
    assert page.locator("#run-filter").is_hidden()
    assert errors == []


def test_run_filter_in_chromium(run_dir, tmp_path, browser):
    shutil.copytree(run_dir, tmp_path / "grpo-seed0")
    page = browser.new_page()
    page.goto(main([str(run_dir), str(tmp_path / "grpo-seed0")]).as_uri())
    assert page.locator("section.sample").count() == 8 and page.locator("#run-filter").is_visible()
    page.select_option("#run", "grpo-seed0")
    assert page.eval_on_selector_all("section.sample", "ss => ss.map(s => s.dataset.run)") == ["grpo-seed0"] * 4
