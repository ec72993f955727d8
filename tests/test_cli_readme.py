"""The README's trainer block, as written, run from a directory outside the repository with stdout and
stderr redirected: each command succeeds, writes where the next one reads, prints only its result on
stdout, draws no progress bars into the log, and the media contract travels from synth to eval.

Only smaller sizes are appended to the lines (argparse and the config overrides take the last value);
`videocom-fast` is a shim on PATH that runs this checkout's `python -m videocom_fast.cli`.
"""
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {   # appended to each command of the block
    "synth": ["--num-samples", "3"],
    "sft": ["max_steps=2", "eval_every=0", "tensorboard=false"],
    "grpo": ["max_steps=1", "prompts_per_step=1", "num_generations=2", "max_new_tokens=16", "tensorboard=false"],
    "eval": ["--limit", "1"],
    "report": [],
}


def trainer_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The trainer"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_block_is_the_chain_we_expect():
    cmds = [line.split()[1] for line in trainer_block()]
    assert cmds == ["synth", "sft", "grpo", "eval", "report"]


@pytest.mark.slow
def test_readme_trainer_block_runs_verbatim(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "videocom-fast"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m videocom_fast.cli \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "user"          # a new user's directory: no configs/ here
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="2")
    results = {}
    for line in trainer_block():
        command = re.sub(r"\s+#.*$", "", line)           # the shell would drop the comment too
        which = command.split()[1]
        extra = " ".join(SMALL[which])
        res = subprocess.run(["bash", "-c", f"{command} {extra} > out.txt 2> err.txt"], cwd=work, env=env,
                             timeout=900)
        out, err = (work / "out.txt").read_text(), (work / "err.txt").read_text()
        assert res.returncode == 0, f"{line}\n{err[-4000:]}"
        assert "\r" not in err, f"{which}: progress bar redraws in a redirected log"
        if which != "report":
            results[which] = json.loads(out)           # stdout holds the result and nothing else
        else:
            assert out.startswith("report: ")
    assert results["synth"]["train_samples"] == 2 and results["synth"]["eval_samples"] == 1
    # the contract: synth wrote sft_tiny's media, SFT recorded them, GRPO read and re-recorded them, eval used them
    synth_media = json.loads((work / "data/synth/media.json").read_text())["media"]
    sft_c = json.loads((work / "runs/sft/media.json").read_text())
    grpo_c = json.loads((work / "runs/grpo/media.json").read_text())
    assert synth_media["image_max_pixels"] == 16 * 28 * 28
    assert sft_c["media"] == synth_media == grpo_c["media"]
    assert sft_c["generation"]["max_new_tokens"] == 64 and grpo_c["generation"]["max_new_tokens"] == 16
    ev = json.loads((work / "runs/grpo/eval.json").read_text())
    assert ev["contract"]["media"] == synth_media and ev["contract"]["generation"]["max_new_tokens"] == 16
    assert (work / "runs/grpo/report.html").is_file()
