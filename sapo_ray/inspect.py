"""One self-contained HTML page of runs' trained samples, token by token, from their experience dumps.

    python -m sapo_ray.inspect RUN_DIR [RUN_DIR ...] [--steps 1,5,10] [--max-samples-per-step 16] [--out FILE]

A run with `trainer.dump_rollouts=true` writes `generations/experience_step_XXXXXX.jsonl` every step: one
record per trained sample with its tokens and, per token, the observation mask, entropy, advantage, the
critic's value and return, segment ends and anchors, the policy loss's log-ratio and clip. The page (by
default `inspect.html` in the first RUN_DIR) holds these records as JSON and its own CSS and script, the
prompts' images as data URIs, so it opens anywhere without a server. Per sample it shows the prompt, gold
answer, reward and images, then the response: each turn and each observation (tool responses) in a box of
its own, the background of a model token its entropy, a bar after each segment's last token, the value at
each anchor, tool calls in blue, clipped tokens underlined in red, all numbers of a token in its tooltip
(rounded to 4 significant digits). Filters: run, step, algorithm, reward (right or wrong answers).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import mimetypes
import re
from pathlib import Path

DUMP_NAME = re.compile(r"^experience_step_(\d{6})\.jsonl$")
# A call runs to its closing tag, or to the end of its turn when the model never closed it.
TOOL_CALL = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.S)
PER_TOKEN = ("observation", "entropy", "advantages", "values", "anchors", "returns", "seg_end", "log_ratio", "clipped")
REQUIRED = ("step", "algorithm", "row", "tokens", "observation", "entropy")
FLOATS = ("entropy", "advantages", "values", "returns", "log_ratio")
# Token class -> the 0/1 field that sets it.
FLAGS = {"obs": "observation", "clipped": "clipped", "seg-end": "seg_end", "anchor": "anchors"}


def dump_files(run_dir: Path) -> dict[int, Path]:
    """Step -> the run's experience dump of that step."""
    files = {int(m.group(1)): p for p in sorted((run_dir / "generations").glob("experience_step_*.jsonl"))
             if (m := DUMP_NAME.match(p.name))}
    if not files:
        raise SystemExit(f"{run_dir}: no experience dumps (generations/experience_step_XXXXXX.jsonl); a run writes "
                         "them with trainer.dump_rollouts=true")
    return files


def read_dump(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a dump (all with 0), by row."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON record ({e})") from None
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise SystemExit(f"{path}:{n}: no {', '.join(missing)} in the record")
        bad = [k for k in PER_TOKEN if record.get(k) is not None and len(record[k]) != len(record["tokens"])]
        if bad:
            raise SystemExit(f"{path}:{n}: {', '.join(bad)} not one value per token ({len(record['tokens'])} tokens)")
        records.append(record)
    records.sort(key=lambda r: r["row"])
    return records[:limit] if limit else records


def turns(observation: list[int]) -> list[tuple[str, int, int]]:
    """The response as its maximal runs: ("turn", start, end) of model tokens, ("obs", start, end) of
    observation tokens, in order, `end` exclusive."""
    parts: list[tuple[str, int, int]] = []
    for i, o in enumerate(observation):
        kind = "obs" if o else "turn"
        if parts and parts[-1][0] == kind:
            parts[-1] = (kind, parts[-1][1], i + 1)
        else:
            parts.append((kind, i, i + 1))
    return parts


def call_mask(tokens: list[str], observation: list[int]) -> list[bool]:
    """Whether each token holds text of a `<tool_call>...</tool_call>` in its turn; the tags may be split
    over tokens, so the calls are found in the turn's text and mapped back to the tokens."""
    mask = [False] * len(tokens)
    for kind, start, end in turns(observation):
        if kind != "turn":
            continue
        offsets = [0]
        for t in tokens[start:end]:
            offsets.append(offsets[-1] + len(t))
        for m in TOOL_CALL.finditer("".join(tokens[start:end])):
            for i in range(start, end):
                a, b = offsets[i - start], offsets[i - start + 1]
                # Overlap, or an empty token strictly inside the call.
                mask[i] = mask[i] or max(a, m.start()) < min(b, m.end()) or m.start() < a < m.end()
    return mask


def token_classes(record: dict) -> list[str]:
    """Each token's classes beyond `tok`, space separated: obs, clipped, seg-end, anchor, call."""
    calls = call_mask(record["tokens"], record["observation"])
    flags = {cls: record.get(key) or [0] * len(calls) for cls, key in FLAGS.items()}
    return [" ".join([cls for cls, on in flags.items() if on[i]] + (["call"] if calls[i] else [])) for i in range(len(calls))]


def short(x):
    """A number to 4 significant digits; a non-finite one as text, which JSON cannot hold as a number."""
    if x is None or isinstance(x, int):
        return x
    return float(f"{x:.4g}") if math.isfinite(x) else str(x)


def view(record: dict, run: str) -> dict:
    """The record as the page reads it: its run, rounded numbers, the images' keys, tokens' classes, turns."""
    out = {**record, "run": run, "images": [f"{run}/{p}" for p in record.get("images") or []]}
    out.update({k: [short(x) for x in record[k]] for k in FLOATS if record.get(k) is not None})
    out["classes"], out["parts"] = token_classes(record), turns(record["observation"])
    return out


def data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's name on the page: its directory's name, or its path where two names are the same."""
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def load(run_dirs: list[Path], steps: list[int] | None, max_per_step: int) -> dict:
    """The page's data: records, images (key "run/path" -> data URI) and the entropy colour scale."""
    records, images, found = [], {}, set()
    for run_dir, run in zip(run_dirs, run_labels(run_dirs)):
        if not run_dir.is_dir():
            raise SystemExit(f"{run_dir}: not a directory (a run directory holds generations/ when the run "
                             "set trainer.dump_rollouts=true)")
        files = dump_files(run_dir)
        found |= set(files)
        for step in sorted(files) if steps is None else [s for s in steps if s in files]:
            for record in read_dump(files[step], max_per_step):
                records.append(view(record, run))
                for path, key in zip(record.get("images") or [], records[-1]["images"]):
                    if key not in images:
                        images[key] = data_uri(run_dir / "generations" / path)
    missing = sorted(set(steps or ()) - found)
    if missing:
        raise SystemExit(f"no experience dump of step(s) {', '.join(map(str, missing))} in {', '.join(map(str, run_dirs))} "
                         f"(dumped: {', '.join(map(str, sorted(found)))})")
    return {"records": records, "images": images, "entropy_scale": entropy_scale(records)}


def entropy_scale(records: list[dict]) -> float:
    """The entropy drawn at full colour: the 98th percentile of the model tokens', so that one outlier does
    not wash out the rest."""
    values = sorted(e for r in records for e, o in zip(r["entropy"], r["observation"])
                    if not o and isinstance(e, float | int))
    return (values[int(0.98 * (len(values) - 1))] if values else 0.0) or 1.0


def script_json(data: dict) -> str:
    """JSON to put inside a <script> element: every `<` escaped, so no text in it (a token `</script>`, `<!--`)
    can end the element."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def page(data: dict, title: str) -> str:
    head, tail = PAGE.split("__DATA__")
    # The run names go in last, so that no text of theirs is taken for a placeholder.
    return head.replace("__CSS__", CSS).replace("__TITLE__", html.escape(title)) + script_json(data) + tail.replace("__JS__", JS)


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        steps = []
    if not steps:
        raise argparse.ArgumentTypeError(f"steps are comma-separated integers, got {text!r}")
    return steps


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m sapo_ray.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--steps", type=parse_steps, default=None, metavar="1,5,10",
                    help="comma-separated steps (default: every dumped step)")
    ap.add_argument("--max-samples-per-step", type=int, default=16, metavar="N",
                    help="the first N rows of each step (0: all)")
    ap.add_argument("--out", type=Path, default=None, metavar="FILE",
                    help="the HTML file (default: RUN_DIR/inspect.html of the first)")
    args = ap.parse_args(argv)
    if args.max_samples_per_step < 0:
        ap.error("--max-samples-per-step is a number of rows, 0 for all")
    data = load(args.run_dirs, args.steps, args.max_samples_per_step)
    out = args.out or args.run_dirs[0] / "inspect.html"
    out.write_text(page(data, "sapo-ray inspect: " + ", ".join(run_labels(args.run_dirs))))
    print(f"{out}: {len(data['records'])} samples, {len(data['images'])} images")
    return out


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>__CSS__</style></head>
<body>
<header id="top"><h1>__TITLE__</h1>
<form id="filters">
<label id="run-filter">run <select id="run"></select></label>
<label>step <select id="step"></select></label>
<label>algorithm <select id="algorithm"></select></label>
<label>reward <select id="reward"><option value="">all</option><option value="right">right</option>
<option value="wrong">wrong</option></select></label>
<span id="count"></span></form>
<p class="legend">entropy <span class="scale"></span> 0 &rarr; <span id="scale-max"></span> &middot;
<span class="tok obs">observation</span> <span class="tok call">tool call</span> <span class="tok clipped">clipped</span>
<span class="tok seg-end">segment end</span> <sup class="value">value</sup> at an anchor &middot;
hover a token for its numbers</p>
</header>
<main id="samples"></main>
<script type="application/json" id="data">__DATA__</script>
<script>__JS__</script>
</body></html>
"""

CSS = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 0; color: #1f2328; }
#top { position: sticky; top: 0; background: #f6f8fa; border-bottom: 1px solid #d0d7de; padding: 6px 16px; z-index: 1; }
h1 { font-size: 16px; margin: 0 0 4px; }
#filters label { margin-right: 12px; }
#count { color: #57606a; }
.legend { margin: 4px 0 0; color: #57606a; }
.scale { display: inline-block; width: 80px; height: 10px; background: linear-gradient(to right, #fff, rgb(255 120 0 / 0.7)); }
main { padding: 0 16px; }
.sample { border: 1px solid #d0d7de; border-radius: 6px; margin: 12px 0; padding: 8px 12px;
          content-visibility: auto; contain-intrinsic-size: auto 400px; }
.sample header { color: #57606a; }
.right { color: #1a7f37; font-weight: 600; } .wrong { color: #cf222e; font-weight: 600; }
.prompt, .response { white-space: pre-wrap; }
.prompt { margin: 6px 0; } .answer { margin-bottom: 6px; }
.images img { max-height: 200px; margin-right: 6px; border: 1px solid #d0d7de; }
.response { font: 13px/1.7 ui-monospace, monospace; }
.turn, .obs-run { border-left: 3px solid #8c959f; padding: 2px 8px; margin: 4px 0; }
.obs-run { background: #ddf4ff; border-color: #54aeff; }
.label { display: block; font: 11px system-ui, sans-serif; color: #57606a; }
.tok { border-radius: 2px; }
.tok.obs { color: #0550ae; font-style: italic; }
.tok.call { color: #0969da; font-weight: 700; }
.tok.clipped { text-decoration: underline wavy #cf222e; }
.tok.seg-end::after { content: "\\2503"; color: #8250df; font-weight: 700; }
.value { font: 9px system-ui, sans-serif; color: #fff; background: #8250df; border-radius: 3px; padding: 0 2px; }
"""

JS = """
const data = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined ? "-" : String(x));
const NUMBERS = [["entropy", "entropy"], ["advantage", "advantages"], ["value", "values"], ["return", "returns"],
                 ["log_ratio", "log_ratio"]];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function token(r, i) {
  const span = el("span", ("tok " + r.classes[i]).trim(), r.tokens[i]);
  span.dataset.i = i;
  if (!r.observation[i] && typeof r.entropy[i] === "number") {
    span.style.background = `rgb(255 120 0 / ${0.7 * Math.min(1, r.entropy[i] / data.entropy_scale)})`;
  }
  const lines = [`#${i} ${JSON.stringify(r.tokens[i])}`];
  for (const [name, key] of NUMBERS) if (r[key]) lines.push(`${name} ${fmt(r[key][i])}`);
  if (r.clipped && r.clipped[i]) lines.push("clipped");
  span.title = lines.join("\\n");
  return span;
}

function header(r) {
  const h = el("header");
  const algo = `${r.algorithm} (` + (r.segmenter ? `${r.segmenter} segments, ` : "") + `${r.ratio_level} ratio)`;
  const verdict = r.acc > 0 ? "right" : "wrong";
  h.append(el("b", "", `${r.run} · step ${r.step} · ${algo}`),
           ` · ${r.pid} · row ${r.row}, group ${r.group} · score ${fmt(r.score)} · `, el("span", verdict, verdict),
           ` · format ${fmt(r.format)}`);
  const ep = r.episode;
  if (ep) {
    const errors = Object.entries(ep.tool_errors || {}).map(([k, n]) => `${k} ${n}`).join(", ");
    h.append(` · ${ep.turns} turns, ${ep.tool_calls} tool calls` + (errors ? `, errors: ${errors}` : "")
             + (ep.cut ? ", cut" : ""));
  }
  return h;
}

function sample(r) {
  const s = el("section", "sample");
  Object.assign(s.dataset, {run: r.run, step: r.step, algorithm: r.algorithm, acc: r.acc, pid: r.pid, row: r.row});
  const prompt = el("div", "prompt"), images = el("div", "images"), response = el("div", "response");
  prompt.append(el("b", "", "prompt "), r.prompt);
  for (const key of r.images) {
    if (data.images[key]) { const img = el("img"); img.src = data.images[key]; img.alt = key; images.append(img); }
    else images.append(el("span", "", `[missing image ${key}]`));
  }
  let turn = 0;
  for (const [kind, start, end] of r.parts) {
    const box = el("div", kind === "obs" ? "obs-run" : "turn");
    box.append(el("span", "label", kind === "obs" ? "observation" : `turn ${++turn}`));
    for (let i = start; i < end; i++) {
      box.append(token(r, i));
      if (r.anchors && r.anchors[i] && r.values) box.append(el("sup", "value", fmt(r.values[i])));
    }
    response.append(box);
  }
  s.append(header(r), prompt, el("div", "answer", `gold: ${r.answer}`), images, response);
  return s;
}

function options(id, values) {
  $(id).replaceChildren(new Option("all", ""), ...values.map((v) => new Option(String(v), String(v))));
}

function render() {
  const f = {run: $("run").value, step: $("step").value, algorithm: $("algorithm").value, reward: $("reward").value};
  const shown = data.records.filter((r) => (!f.run || r.run === f.run) && (!f.step || String(r.step) === f.step)
    && (!f.algorithm || r.algorithm === f.algorithm) && (!f.reward || (f.reward === "right") === (r.acc > 0)));
  $("samples").replaceChildren(...shown.map(sample));
  $("count").textContent = `${shown.length} of ${data.records.length} samples`;
}

const unique = (key) => [...new Set(data.records.map((r) => r[key]))];
options("run", unique("run"));
options("step", unique("step").sort((a, b) => a - b));
options("algorithm", unique("algorithm").sort());
$("run-filter").hidden = unique("run").length < 2;
$("scale-max").textContent = fmt(data.entropy_scale);
$("filters").addEventListener("change", render);
render();
"""

if __name__ == "__main__":
    main()
