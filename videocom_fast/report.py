"""Trajectory records and the self-contained HTML report (`videocom-fast report RUN_DIR`).

A run directory holds:
  trajectories*.jsonl   one record per episode (`trajectory_record`): each round's text, action, the exact
                        media the model received (thumbnails; zoom boxes drawn on the source frame), rewards
  */metrics.jsonl       training metrics written by the SFT and GRPO loops
  eval*.json            `videocom-fast eval` summaries
The report embeds every distinct image once (JPEG, base64, in one script array) so the single HTML file
can be mailed or archived; every episode is in it, collapsed to a summary line, with a filter per section.
Frame numbers are shown 1-based, as the overlay writes them.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

THUMB_H = 96


# --- records ------------------------------------------------------------------------------------------

def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _thumb(frame_HWC, height: int = THUMB_H, box=None, max_width: int = 4 * THUMB_H):
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame_HWC.cpu().numpy())
    if box is not None:   # x2/y2 are exclusive: the outline's last pixels are x2-1/y2-1, clamped into the frame
        x1, y1, x2, y2 = box
        r = [max(0, x1), max(0, y1), min(img.width, x2) - 1, min(img.height, y2) - 1]
        if r[2] >= r[0] and r[3] >= r[1]:
            ImageDraw.Draw(img).rectangle(r, outline=(255, 40, 40), width=max(1, min(img.height // 90, 3)))
    # a thin crop (say 300x2 px) scaled to `height` would be 15,000 px wide: fit it into height x max_width
    scale = min(height / img.height, max_width / img.width)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))


def media_record(item) -> dict:
    """What the model received for one media item, as small pictures plus the request's facts."""
    rec = {"kind": item.kind, "indices": [int(i) for i in item.indices], "box": list(item.box) if item.box else None,
           "resized_hw": list(item.resized_hw) if item.resized_hw else None, "thumbs": []}
    frames = item.frames
    if item.kind == "video":
        step = max(1, len(frames) // 8)
        rec["thumbs"] = [_png_b64(_thumb(f)) for f in frames[::step][:8]]
    else:
        rec["thumbs"] = [_png_b64(_thumb(frames[0], box=item.box))]
        if item.box is not None:
            x1, y1, x2, y2 = item.box
            rec["crop"] = _png_b64(_thumb(frames[0][y1:y2, x1:x2], height=THUMB_H))
    return rec


def trajectory_record(traj, sample: dict, rewards: dict | None = None) -> dict:
    rounds = []
    for i, text in enumerate(traj.round_texts):
        obs = traj.observations[i] if i < len(traj.observations) else None
        act = traj.actions[i] if i < len(traj.actions) else None
        rounds.append({
            "text": text,
            "action": None if act is None else {"kind": act.kind, "values": _jsonable(act.values),
                                                "description": act.description},
            "reply": None if obs is None else obs.text,
            "reason": None if obs is None else obs.reason,
            "media": [] if obs is None else [media_record(m) for m in obs.media],
        })
    return {
        "sample_index": traj.sample_index, "rollout_index": traj.rollout_index,
        "question": _question(sample), "gold": _gold(sample), "finish_reason": traj.finish_reason,
        "num_generated": int(sum(traj.generated_mask)), "num_tokens": len(traj.token_ids),
        "prompt_media": [media_record(traj.media[0])] if traj.media else [],
        "rounds": rounds, "rewards": rewards or {},
    }


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _question(sample: dict) -> str:
    conv = sample.get("conversations") or []
    return conv[0]["value"].replace("<video>", "").strip() if conv else ""


def _gold(sample: dict) -> str:
    conv = sample.get("conversations") or []
    return conv[-1]["value"].strip() if len(conv) > 1 else ""


def write_records(path, records) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


# --- report -------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def _curve_png(metrics: list[dict], keys: list[str], title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(m.get("step", i), m[k]) for i, m in enumerate(metrics) if isinstance(m.get(k), (int, float))]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for k, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px}
.traj{border:1px solid #ccc;border-radius:6px;padding:6px 10px;margin:6px 0}
.traj summary{cursor:pointer}.round{border-left:3px solid #4a7;padding:4px 10px;margin:8px 0}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;margin:4px 0}
.media img{margin:2px;border:1px solid #999}.reason{color:#a40}.rw{font-family:monospace}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"""

# Every distinct picture is stored once, in one script array, and each <img> names its index: the G rollouts
# of a prompt show the same prompt video, and many ask for the same frame (the demo's report embedded 848
# pictures, 277 distinct, as 26 MB of inline PNGs). Pictures are re-encoded as JPEG (q 80) for the page.
_SCRIPT = """<script>
const IMG = %s;
for (const e of document.querySelectorAll("img[data-i]")) e.src = "data:image/jpeg;base64," + IMG[+e.dataset.i];
function filt(sec, q) {
  q = q.toLowerCase();
  for (const d of document.querySelectorAll(`#${sec} details.traj`))
    d.style.display = d.querySelector("summary").textContent.toLowerCase().includes(q) ? "" : "none";
}
</script>"""


class _Pool:
    """Distinct pictures (base64 PNG as stored in the records) -> index into the page's IMG array."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.jpegs: list[str] = []

    def img(self, b64png: str, cls: str, alt: str) -> str:
        i = self.index.get(b64png)
        if i is None:
            i = self.index[b64png] = len(self.jpegs)
            self.jpegs.append(_to_jpeg(b64png))
        return f'<img class="{cls}" alt="{html.escape(alt)}" data-i="{i}">'

    def script(self) -> str:
        return _SCRIPT % json.dumps(self.jpegs)


def _to_jpeg(b64png: str) -> str:
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, cls: str = "", alt: str = "") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _frames(indices) -> str:
    """Frame numbers as the overlay writes them: 1-based (records keep the decoder's 0-based indices)."""
    nums = [i + 1 for i in indices]
    return ", ".join(map(str, nums[:6])) + (f", ... ({len(nums)} frames)" if len(nums) > 6 else "")


def _media_html(m: dict, pool: _Pool, reply: str | None = None) -> str:
    if m["kind"] == "video":
        label = f"video, frames {_frames(m['indices'])}"
    elif m.get("box"):
        # what the environment answered: the crop it cut, in the frame's original pixels (x2/y2 exclusive)
        label = f"zoom: crop {m['box']} (original pixels) of frame {_frames(m['indices'])}"
    else:
        label = f"frame {_frames(m['indices'])}"
    if reply:
        label += f" ({reply})"
    imgs = "".join(pool.img(t, "thumb", label) for t in m["thumbs"])
    if m.get("crop"):
        imgs += " &rarr; " + pool.img(m["crop"], "crop", "zoomed crop")
    return f'<div class="media" data-kind="{m["kind"]}"><small>{html.escape(label)}</small><br>{imgs}</div>'


def _answered(r: dict) -> str:
    letters = [rd["action"]["values"] for rd in r["rounds"]
               if rd.get("action") and rd["action"].get("kind") == "answer"]
    return letters[-1] if letters else "nothing"


def _traj_html(r: dict, pool: _Pool, open_: bool = False) -> str:
    rw = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.get("rewards", {}).items())
    gold = (r["gold"][:1] or "?")
    parts = [f'<details class="traj" data-sample="{r["sample_index"]}"{" open" if open_ else ""}><summary>'
             f'<b>sample {r["sample_index"]} / rollout {r["rollout_index"]}</b> &middot; '
             f'<span class="answered">answered {html.escape(_answered(r))}, gold {html.escape(gold)}</span> '
             f'&middot; finish: {html.escape(r["finish_reason"])} &middot; {len(r["rounds"])} rounds, '
             f'{r["num_generated"]} generated / {r["num_tokens"]} tokens &middot; '
             f'<span class="rw">{html.escape(rw)}</span></summary>',
             f'<pre class="question">{html.escape(r["question"])}</pre>',
             f'<div>gold: <b>{html.escape(r["gold"])}</b></div>']
    parts += [_media_html(m, pool) for m in r.get("prompt_media", [])]
    for i, rd in enumerate(r["rounds"]):
        act = rd["action"]
        a = f'{act["kind"]} {act["values"]}' if act else "none"
        parts.append(f'<div class="round"><b>round {i + 1}</b> action: <code class="action">{html.escape(a)}</code>'
                     f'<pre class="text">{html.escape(rd["text"])}</pre>')
        if rd.get("reply"):
            parts.append(f'<div>reply: {html.escape(rd["reply"])} <span class="reason">({html.escape(rd["reason"] or "")})</span></div>')
        parts += [_media_html(m, pool, rd.get("reason")) for m in rd["media"]]
        parts.append("</div>")
    parts.append("</details>")
    return "\n".join(parts)


_CURVES = (("sft", ["loss", "eval_loss"], "SFT loss"),
           ("grpo", ["reward/mean", "reward/accuracy/mean", "reward/reasoning/mean", "reward/format/mean"],
            "GRPO reward"),
           ("grpo", ["kl"], "GRPO KL to the reference"))


def write_report(run_dir, out=None) -> Path:
    """Render RUN_DIR into one self-contained HTML file (default RUN_DIR/report.html): every episode of every
    trajectories*.jsonl, collapsed to a one-line summary (answered X, gold Y, finish, rewards) with a filter."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"report: run directory {run} does not exist")
    out = Path(out) if out else run / "report.html"
    pool = _Pool()
    body = [f"<h1>videocom_fast run: {html.escape(run.name)}</h1>"]
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in s.items())
        body.append(f'<h2>Summary</h2><table id="summary">{rows}</table>')
    curves = []
    for name, keys, title in _CURVES:
        mfile = run / name / "metrics.jsonl"
        if mfile.exists():
            png = _curve_png(_read_jsonl(mfile), keys, title)
            if png:
                curves.append(_img(png, "curve", title))
    if curves:
        body.append("<h2>Training curves</h2>" + "".join(curves))
    for ev in sorted(run.glob("eval*.json")):
        e = json.loads(ev.read_text())
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                       for k, v in e.items() if not isinstance(v, (list, dict)))
        rows += _contract_rows(e.get("contract"))
        body.append(f"<h2>{html.escape(ev.stem)}</h2><table>{rows}</table>")
    n = 0
    for tf in sorted(run.glob("trajectories*.jsonl")):
        recs = _read_jsonl(tf)
        sec = html.escape(tf.stem)
        body.append(f'<h2>{sec} ({len(recs)} episodes)</h2><div id="{sec}">'
                    f'<input placeholder="filter: sample 3, answered B, finish: answer ..." size="50" '
                    f'oninput="filt(\'{sec}\', this.value)"> click an episode to open it')
        body += [_traj_html(r, pool, open_=k == 0) for k, r in enumerate(recs)]
        body.append("</div>")
        n += len(recs)
    if n == 0:
        body.append("<p>No trajectories in this run directory.</p>")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>videocom_fast report</title>"
           f"<style>{_CSS}</style></head><body>{''.join(body)}{pool.script()}</body></html>")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(doc)
    tmp.replace(out)
    return out


def _contract_rows(contract) -> str:
    """The media settings and generation limits the episodes ran under (videocom_fast.contract)."""
    if not isinstance(contract, dict):
        return ""
    rows = [(k, ", ".join(f"{a}={b}" for a, b in (contract.get(k) or {}).items())) for k in ("media", "generation")]
    rows.append(("from", "; ".join(f"{a}: {b}" for a, b in (contract.get("sources") or {}).items())))
    return "".join(f'<tr class="contract"><th>{k}</th><td>{html.escape(v)}</td></tr>' for k, v in rows if v)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
