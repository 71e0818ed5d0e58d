"""The capstone's faults (chapter 08): each ends in a non-zero exit and one clear line on stderr from
rank 0, within the collective timeout plus torchrun's 30 s on every rank, and no process left behind.

Most cases run `main` in this process (the checks that come before any collective are the same on every
rank); the ones that need ranks run through torchrun, two processes each."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisgl.launch as launch_module
from test_capstone import ROOT, SCRIPT, assert_one_error, launch, launch_env, reap

# Reading a checkpoint is enough to show each fault; nothing below needs more than 4 new tokens.
SHORT = ["--device", "cpu", "--max_new_tokens", "4"]


@pytest.fixture(autouse=True)
def rank_0_alone(monkeypatch):
    "In-process cases run as rank 0 of one, whatever started pytest."
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def run_main(capsys, *argv: str) -> tuple[int, str]:
    "`main` in this process, as the script runs it: (exit code, the one line on stderr)."
    code = launch_module.main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code, lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    "Fail the test if the launcher goes past its checks into joining and loading."
    def refuse(plan):
        raise AssertionError("execute() ran: a check came too late")
    monkeypatch.setattr(launch_module, "execute", refuse)


# --- the command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "1e-45"])
def test_temperature_not_finite_or_too_small(capsys, no_loading, value):
    code, line = run_main(capsys, "--temperature", value, *SHORT)
    assert code == 2 and "argument --temperature" in line and f"got {value}" in line


@pytest.mark.parametrize("argv,fragment", [
    (["--timeout", "0"], "argument --timeout: must be a number of seconds > 0, got '0'"),
    (["--timeout", "-5"], "argument --timeout: must be a number of seconds > 0, got '-5'"),
    (["--max_seq_len", "0"], "argument --max_seq_len: must be an integer >= 1, got '0'"),
    (["--tp_size", "two"], "argument --tp_size: must be an integer >= 1, got 'two'"),
    (["--no_such_option"], "unrecognized arguments: --no_such_option"),
])
def test_argument_errors(capsys, no_loading, argv, fragment):
    code, line = run_main(capsys, *argv, *SHORT)
    assert code == 2 and fragment in line and "--help" in line


def test_empty_model_path_is_an_error_not_the_tiny_model(capsys, no_loading):
    code, line = run_main(capsys, "--model_path", "", *SHORT)
    assert code == 1 and "--model_path is empty" in line


def test_negative_prompt_id_is_read_as_a_value(capsys, no_loading):
    "argparse would take -1,2 for an option; the launcher reads it as the prompt and names the bad id."
    code, line = run_main(capsys, "--prompt_ids", "-1,2", *SHORT)
    assert code == 1 and line == "error: prompt 0 has token id -1 outside the vocabulary [0, 258)"
    assert launch_module.parse_args(["--prompt", "-x", "--stop", "-"]).stop == ["-"]


def test_parse_args_alone_exits_2_with_one_line(capsys):
    "Callers other than main (a server's own main, say) get argparse's exit code, without its screenful."
    with pytest.raises(SystemExit) as stop:
        launch_module.parse_args(["--top_p", "2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: argument --top_p: top_p must be in (0, 1], got 2.0 "
                                       "(run_inference.py --help lists the options)\n")


def test_llm_options_get_the_same_checks():
    "Options that skip argparse (LLM(...) passes them as values) are checked by prepare."
    args = launch_module.parse_args(SHORT)
    args.max_seq_len = 0
    with pytest.raises(ValueError, match=r"--max_seq_len must be an integer >= 1, got 0"):
        launch_module.prepare(args)


def test_other_ranks_say_nothing_and_exit_2(capsys, monkeypatch):
    "Rank 1 of 2 with a bad command line: silent (rank 0 speaks), exit code 2 like rank 0."
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(launch_module, "_REPORT_GRACE_S", 0.05)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert launch_module.main(["--temperature", "nan"]) == 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().err == ""


def test_argument_error_under_torchrun_is_one_line():
    done = launch(2, "--tp_size", "1", "--ep_size", "2", "--device", "cpu", "--temperature", "nan")
    assert_one_error(done, "argument --temperature", "got nan")
    # torchrun's summary: both ranks exited with 2 (rank 1 on torchrun's SIGTERM, after waiting for rank 0).
    assert re.findall(r"exitcode\s+:\s*(-?\d+)", done.stderr) == ["2", "2"], done.stderr[-3000:]


# --- files --------------------------------------------------------------------------------------------

def copy_checkpoint(checkpoint, target):
    shutil.copytree(checkpoint, target)
    return target


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json"])
def test_malformed_json_file_is_named(capsys, no_loading, tmp_path, tiny_checkpoint, name):
    broken = copy_checkpoint(tiny_checkpoint, tmp_path / "broken")
    (broken / name).write_text('{"eos_token_id": [1, 2,\n')
    code, line = run_main(capsys, "--model_path", str(broken), *SHORT)
    assert code == 1 and f"{name} ({broken / name}) is not valid JSON" in line, line


def test_relative_path_that_is_not_here(capsys, no_loading, monkeypatch, tmp_path):
    "checkpoints/x with checkpoints/ here: a missing directory, said before any hub is asked."
    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub")
    monkeypatch.setattr(launch_module, "resolve_model_path", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    code, line = run_main(capsys, "--model_path", "checkpoints/x", *SHORT)
    assert code == 1 and line == "error: no checkpoint directory at checkpoints/x"


def test_hub_like_path_says_it_is_not_here_either(capsys, no_loading, monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network asked
    monkeypatch.chdir(tmp_path)
    code, line = run_main(capsys, "--model_path", "checkpoints/x", *SHORT)
    assert code == 1 and line.startswith("error: no checkpoint directory at checkpoints/x, and could not "
                                         "download 'checkpoints/x'"), line


def test_memory_checked_before_allocating_on_cpu(capsys, no_loading, monkeypatch):
    import psutil

    class Little:
        available = 64 * 2**10
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    code, line = run_main(capsys, *SHORT)
    assert code == 1 and re.fullmatch(
        r"error: the weights need [\d.]+ KiB per rank x 1 ranks on this machine \(tp_size 1 x ep_size 1, "
        r"float32\), but it has 64\.0 KiB available", line), line


@pytest.mark.parametrize("line,fragment", [
    ('{"prompt_ids": [1, 2}', "not valid JSON"),
    ('{"prompt_ids": [1, 2], "temp": 1.0}', "unknown field 'temp'"),
    ('{"prompt_ids": [1, 2], "temperature": -1}', "temperature must be 0 (greedy)"),
    ('{"prompt_ids": [1, 2], "top_p": 0}', "top_p must be in (0, 1]"),
    ('{"prompt_ids": [1, 99999]}', "token id 99999 outside the vocabulary"),
    ('{"prompt": "hi", "prompt_ids": [1]}', "exactly one of"),
])
def test_prompt_file_errors_name_file_and_line(capsys, no_loading, tmp_path, line, fragment):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt_ids": [5, 6, 7]}\n\n' + line + "\n")
    code, error = run_main(capsys, "--prompt_file", str(requests), *SHORT)
    assert code == 1 and f"--prompt_file {requests}, line 3: " in error and fragment in error, error


# --- the --json report -------------------------------------------------------------------------------

def test_json_path_checked_before_loading(capsys, no_loading, tmp_path, tiny_checkpoint):
    cases = {str(tmp_path): "is a directory",
             str(tmp_path / "no" / "report.json"): "no directory",
             str(tiny_checkpoint / "report.json"): "inside the checkpoint directory"}
    for path, fragment in cases.items():
        code, line = run_main(capsys, "--model_path", str(tiny_checkpoint), "--json", path, *SHORT)
        assert code == 1 and f"--json {path}" in line and fragment in line, line


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_report_is_strict_json_written_by_rename(tmp_path):
    target = tmp_path / "report.json"
    launch_module.write_report({"gap": math.nan, "by_rank": [1.5, -math.inf], "n": 3}, target)
    assert strict_json(target.read_text()) == {"gap": None, "by_rank": [1.5, None], "n": 3}
    # A report that cannot be written leaves the last good one whole, and no temporary file.
    with pytest.raises(TypeError):
        launch_module.write_report({"gap": object()}, target)
    assert strict_json(target.read_text())["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_report_written_by_the_script(capsys, tmp_path):
    target = tmp_path / "report.json"
    assert launch_module.main(["--prompt_ids", "5,6,7", "--json", str(target), "--record_margins",
                               *SHORT]) == 0
    assert f"report written to {target}" in capsys.readouterr().out
    report = strict_json(target.read_text())
    assert len(report["outputs"][0]["output_ids"]) == 4 and [p.name for p in tmp_path.iterdir()] == [
        "report.json"]


# --- faults of the weights and of the ranks ----------------------------------------------------------

def test_nan_weights_stop_after_prefill(tmp_path, tiny_checkpoint):
    "Every rank learns of the NaN logits in the same step; rank 0 names the cause, once."
    broken = tmp_path / "nan"
    shutil.copytree(tiny_checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], math.nan)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    done = launch(2, "--model_path", str(broken), "--ep_size", "2", "--prompt_ids", "1,2,3", *SHORT)
    assert_one_error(done, "non-finite logits after prefill", "corrupt weights")


def test_a_rank_that_never_arrives():
    "Rank 0 of 2 alone (rank 1 never starts): joining the job ends after --timeout, in one line."
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    done = launch(1, "--ep_size", "2", "--device", "cpu", "--timeout", "3", RANK="0", WORLD_SIZE="2",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert time.monotonic() - start < 3 + 30
    assert_one_error(done, "joining the job timed out after --timeout 3 s")


def workers(proc: subprocess.Popen) -> dict[int, "psutil.Process"]:
    "torchrun's worker processes by RANK."
    import psutil
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def wait_until_generating(rank_1) -> None:
    """Until rank 1 has joined every group and started generating: its TCP connections (one per peer
    and group) stop changing for 1.5 s."""
    count, since = None, time.monotonic()
    deadline = since + 60
    while time.monotonic() - since < 1.5 or not count:
        assert time.monotonic() < deadline, "rank 1 opened no connection, or they never settled, in 60 s"
        now = len(rank_1.net_connections(kind="tcp"))
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.05)


def test_a_stopped_rank_times_out_in_one_line():
    """`kill -STOP` on rank 1 while it generates (with a 5 s timeout instead of the default 600):
    rank 0 gives up within the timeout plus a grace, with the collective's one line, and torchrun stops
    rank 1 within its own 30 s."""
    timeout = 5
    tag = uuid.uuid4().hex
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               "--tp_size", "1", "--ep_size", "2", "--device", "cpu", "--ignore_eos", "--max_new_tokens", "480",
               "--timeout", str(timeout)]
    proc = subprocess.Popen(command, cwd=ROOT, env=launch_env(tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(ranks := workers(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2, "torchrun did not start two workers"
        wait_until_generating(ranks[1])
        ranks[1].suspend()  # kill -STOP
        stopped = time.monotonic()
        ranks[0].wait(timeout=timeout + 30)
        rank_0_left = time.monotonic() - stopped
        _, stderr = proc.communicate(timeout=timeout + 60)
        everyone_left = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = reap(tag)
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    assert proc.returncode != 0
    assert rank_0_left < timeout + 10, rank_0_left
    assert everyone_left < timeout + 30 + 10, everyone_left
    line = assert_one_error(subprocess.CompletedProcess(command, proc.returncode, "", stderr), "timed out")
    # Which wait gives up first depends on where rank 1 stopped: a collective of the model (named, with its
    # group and the rank waited for), one of the runtime's own exchanges, or a group still being made.
    groups = "EP group 0|the default group|the control group"
    assert re.fullmatch(rf"error: (all_to_all|all_reduce|all_gather) over ({groups}) "
                        r"\(ranks \[0, 1\]\) timed out after [\d.]+ s waiting for rank 1"
                        r"|error: a collective timed out after --timeout 5 s waiting for another rank \(.*\)"
                        r"|error: joining the job timed out after --timeout 5 s: not every rank arrived \(.*\)",
                        line), line
