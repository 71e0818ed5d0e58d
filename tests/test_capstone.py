"""The capstone script end to end (chapter 08): torchrun, every layout with world <= 8, transformers' greedy
tokens, and bad input ending in one line, a non-zero exit and no process left behind."""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from minisgl.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_inference.py"
TEXT = "Hi there"
PROMPT_IDS = [[256, 72, 101, 108, 108, 111], list(range(40, 57)), [101], [7, 300, 12]]  # 6, 17, 1, 3 tokens
PROMPTS = [list(TEXT.encode())] + PROMPT_IDS  # the tiny model's tokenizer is bytes; --prompt comes first
NEW_TOKENS = 8
TIMEOUT_S = 120
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4), (2, 4)]
VICTIM = "model.layers.1.mlp.experts.5.up_proj.weight"


def _leftovers(tag: str) -> list[psutil.Process]:
    "Processes that inherited this launch's tag (torchrun starts its workers in sessions of their own)."
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("MINISGL_TEST_TAG") == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def launch_env(tag: str, **extra: str) -> dict:
    "The capstone's environment: one thread, the repository importable, and a tag to find its processes by."
    return {**os.environ, "OMP_NUM_THREADS": "1", "MINISGL_TEST_TAG": tag, **extra,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def reap(tag: str) -> list[psutil.Process]:
    "Wait up to 10 s for the tagged processes to end; kill and return those still there."
    deadline = time.monotonic() + 10
    while (left := _leftovers(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        proc.kill()
    return left


def launch(nproc: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the capstone: plain python for one process, torchrun otherwise (`env`: extra variables). Fails
    the test if it runs past TIMEOUT_S or leaves any process behind."""
    tag = uuid.uuid4().hex
    env = launch_env(tag, **env)
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    try:
        done = subprocess.run([*launcher, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        done = None
    left = reap(tag)
    assert done is not None, f"the capstone ({nproc} processes) ran past {TIMEOUT_S} s: a hang"
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    return done


def prompt_args() -> list[str]:
    return ["--prompt", TEXT, *[a for p in PROMPT_IDS for a in ("--prompt_ids", ",".join(map(str, p)))]]


def greedy_reference(model) -> list[list[int]]:
    with torch.no_grad():
        outs = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert all(len(o) == NEW_TOKENS for o in outs)  # eos ignored, as --ignore_eos does
    return outs


@pytest.fixture(scope="module")
def expected_ids(reference_model):
    return greedy_reference(reference_model)


def run_capstone(tmp_path, checkpoint, tp: int, ep: int, *extra: str) -> dict:
    report_path = tmp_path / f"tp{tp}_ep{ep}.json"
    done = launch(tp * ep, "--model_path", str(checkpoint), "--tp_size", str(tp), "--ep_size", str(ep),
                  "--device", "cpu", "--dtype", "float32", "--max_new_tokens", str(NEW_TOKENS), "--ignore_eos",
                  "--json", str(report_path), *prompt_args(), *extra)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "time to first token" in done.stdout and "output:" in done.stdout, done.stdout
    return json.loads(report_path.read_text())


@pytest.mark.parametrize("tp,ep", LAYOUTS, ids=[f"tp{tp}-ep{ep}" for tp, ep in LAYOUTS])
def test_greedy_tokens_equal_transformers(tmp_path, tiny_checkpoint, expected_ids, tp, ep):
    report = run_capstone(tmp_path, tiny_checkpoint, tp, ep)
    assert [o["prompt_ids"] for o in report["outputs"]] == PROMPTS
    assert [o["output_ids"] for o in report["outputs"]] == expected_ids
    layout, timing = report["layout"], report["timing"]
    assert (layout["tp_size"], layout["ep_size"], layout["world_size"]) == (tp, ep, tp * ep)
    assert layout["gpu"] is None and layout["date"] and layout["dtype"] == "float32"
    assert timing["output_tokens"] == len(PROMPTS) * NEW_TOKENS and timing["output_tokens_per_second"] > 0
    assert timing["time_to_first_token_seconds"] > 0 and timing["steps"] >= NEW_TOKENS
    assert len(timing["weight_bytes_by_rank"]) == tp * ep
    assert timing["weight_bytes_per_rank"] == max(timing["weight_bytes_by_rank"])
    assert report["outputs"][0]["prompt"] == TEXT and report["outputs"][1]["prompt"] is None


def test_sharded_checkpoint(tmp_path, sharded_tiny_checkpoint):
    "Shards listed in model.safetensors.index.json: each rank finds its slices across the files."
    from transformers import Qwen3MoeForCausalLM
    assert (sharded_tiny_checkpoint / "model.safetensors.index.json").is_file()
    reference = Qwen3MoeForCausalLM.from_pretrained(sharded_tiny_checkpoint, dtype=torch.float32).eval()
    report = run_capstone(tmp_path, sharded_tiny_checkpoint, 1, 2)
    assert [o["output_ids"] for o in report["outputs"]] == greedy_reference(reference)


# Bad input: one line on stderr naming the numbers or the tensor, exit code 1, every process gone.

def damaged_copy(checkpoint: Path, target: Path, change) -> Path:
    target.mkdir()
    for file in checkpoint.iterdir():
        if file.suffix != ".safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    save_file(change(load_file(checkpoint / "model.safetensors")), target / "model.safetensors",
              metadata={"format": "pt"})
    return target


def assert_one_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, done.stderr[-4000:]  # rank 0 speaks for all, once
    # No traceback from the engine; torchrun's own report of the failed processes may follow.
    assert not re.search(r'File ".*(minisgl|run_inference)', done.stderr), done.stderr[-4000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_world_size_must_be_tp_times_ep():
    done = launch(2, "--tp_size", "2", "--ep_size", "2", "--device", "cpu")
    assert_one_error(done, "world size 2 != tp_size 2 x ep_size 2 = 4", "--nproc_per_node=4")


def test_experts_must_divide_over_ep():
    done = launch(3, "--ep_size", "3", "--device", "cpu")
    assert_one_error(done, "num_experts (8) is not divisible by ep_size (3)")


def test_prompt_longer_than_context():
    done = launch(1, "--device", "cpu", "--max_seq_len", "16", "--max_new_tokens", "4",
                  "--prompt_ids", ",".join(["7"] * 20))
    assert_one_error(done, "prompt 0 has 20 tokens", "16")


def test_checkpoint_missing_a_tensor(tmp_path, tiny_checkpoint):
    broken = damaged_copy(tiny_checkpoint, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != VICTIM})
    done = launch(1, "--model_path", str(broken), "--device", "cpu")
    assert_one_error(done, f"no tensor '{VICTIM}'")


def test_checkpoint_with_a_misshaped_tensor(tmp_path, tiny_checkpoint):
    broken = damaged_copy(tiny_checkpoint, tmp_path / "misshaped", lambda t: {**t, VICTIM: t[VICTIM][:-1]})
    done = launch(1, "--model_path", str(broken), "--device", "cpu")
    assert_one_error(done, f"'{VICTIM}' has shape [31, 64]", "implies [32, 64]")


def test_missing_checkpoint_directory(tmp_path):
    done = launch(1, "--model_path", str(tmp_path / "no-such-checkpoint"), "--device", "cpu")
    assert_one_error(done, "no checkpoint directory at", "no-such-checkpoint")


def test_missing_weight_file(tmp_path, tiny_checkpoint):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    done = launch(1, "--model_path", str(broken), "--device", "cpu")
    assert_one_error(done, "no model.safetensors")


def _main_with_one_broken_rank(checkpoint_dir: str, broken_rank: int):
    "On a simulated rank: main() with a weight source that fails on `broken_rank` only."
    import torch.distributed as dist

    import minisgl.launch as launch_module
    from minisgl.weights import CheckpointError

    class BrokenOnOneRank(launch_module.SafetensorsSource):
        def _read(self, name, shard):
            if dist.get_rank() == broken_rank:
                raise CheckpointError(f"could not read {name!r}: input/output error")
            return super()._read(name, shard)

    os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
    launch_module.SafetensorsSource = BrokenOnOneRank
    stderr = StringIO()
    with redirect_stderr(stderr):
        code = launch_module.main(["--model_path", checkpoint_dir, "--tp_size", "2", "--ep_size", "2",
                                   "--device", "cpu", "--prompt_ids", "1,2,3"])
    return code, stderr.getvalue()


def test_a_load_failure_on_one_rank_stops_every_rank(tiny_checkpoint):
    "The rank that failed names itself; the others learn of it through the all-reduce of flags and exit too."
    results = run_on_ranks(_main_with_one_broken_rank, 4, str(tiny_checkpoint), 2, timeout_s=60)
    assert [code for code, _ in results] == [1, 1, 1, 1]
    assert results[0][1].strip() == "error: ranks [2] could not load their weights (each said why)"
    assert results[1][1] == results[3][1] == ""
    assert results[2][1].startswith("error (rank 2): could not read 'model.")


# Every command the book and the README show is one the script accepts.

def shown_commands(script: str = "run_inference.py") -> list[tuple[str, str]]:
    "(where, command) for every `torchrun ... scripts/<script> ...` in the notebooks, the book's pages and the README."
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({f"book/{page.name}": page.read_text() for page in sorted((ROOT / "book").glob("*.md"))})
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        texts[notebook.name] = "\n".join("".join(cell["source"]) for cell in cells)
    commands = []
    for where, text in texts.items():
        text = re.sub(r"\\\\?\n", " ", text)  # continued lines (a Python string doubles the backslash)
        # To the end of the line or of the inline code span.
        for match in re.finditer(r"torchrun [^`\n]*?scripts/" + re.escape(script) + r"[^`\n]*", text):
            commands.append((where, match.group(0)))
    return commands


def test_shown_server_commands_parse():
    "Each shown `torchrun ... scripts/serve.py ...` parses: the server's own options, then the launcher's."
    import shlex

    from minisgl.launch import UsageError, parse_args
    from minisgl.server.main import server_parser
    commands = shown_commands("serve.py")
    assert {where for where, _ in commands} >= {"README.md"}, commands
    for where, command in commands:
        words = shlex.split(command, comments=True)
        server_args, rest = server_parser().parse_known_args(words[words.index("scripts/serve.py") + 1:])
        try:
            args = parse_args(rest, exit_on_error=False)
        except UsageError as exc:
            raise AssertionError(f"{where}: {command!r}: {exc}") from None
        nproc = next(w.split("=")[1] for w in words if w.startswith("--nproc_per_node="))
        assert int(nproc) == args.tp_size * args.ep_size and server_args.port > 0, f"{where}: {command!r}"


def test_shown_commands_parse():
    "Each shown command's script arguments parse (an unknown or malformed option fails) and ask for a valid layout."
    import shlex

    from minisgl.launch import UsageError, parse_args
    commands = shown_commands()
    assert {where for where, _ in commands} >= {"README.md", "08_capstone.ipynb"}, commands
    for where, command in commands:
        words = shlex.split(command, comments=True)
        script_args = words[words.index("scripts/run_inference.py") + 1:]
        try:
            args = parse_args(script_args, exit_on_error=False)
        except UsageError as exc:
            raise AssertionError(f"{where}: {command!r}: {exc}") from None
        nproc = next(w.split("=")[1] if "=" in w else words[i + 1] for i, w in enumerate(words)
                     if w.startswith(("--nproc_per_node", "--nproc-per-node")))
        nnodes = next((int(words[i + 1]) for i, w in enumerate(words) if w == "--nnodes"), 1)
        assert int(nproc) * nnodes == args.tp_size * args.ep_size, f"{where}: {command!r}"
