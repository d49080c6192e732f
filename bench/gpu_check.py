"""Every GPU check of the performance issue, as one command per device call.

A device session has about 15 minutes of GPU time, 10 minutes per command, and the machine is
bare. This driver runs the checks in priority order, each as its own process under a time
budget cut to what is left of `--deadline_s`, so a slow compile costs one number, not the call.
It writes two files under `--out`: `gpu_check.log` (every check's full output) and
`gpu_check.jsonl` (per check: exit code, seconds, the bench's JSON result or the smoke run's
last lines).

Here, once per checkout (CPU): `make gpu-prep` (wheels the GPU machine lacks into `.whl/`, the
SmolLM2 tokenizer into `.gpu/tokenizer`, both git-ignored). On the device (`carry`: .whl, .gpu):

    S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" && \
      PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --part=1 --out=$OUT

then `--part=2` in a second call (and `--part=3`, `--part=4`, `--part=5`, then `--part=6`, in
a session with time left, or in one after a session that ran parts 1 and 2). Rehearse the whole
plan here with tiny shapes: `python -m bench.gpu_check --tiny --out=/tmp/gpu_check`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, ".gpu", "tokenizer")
MIN_USEFUL_S = 30  # a check with less time than this left is skipped, not started
SMOKE_PRESET = "qwen2.5-0.5b"  # random weights; the smallest reference-family shape


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    part: int
    budget_s: int
    argv: tuple[str, ...]  # after `python -m`; the full-size shape
    tiny_argv: tuple[str, ...]  # the same check on tiny shapes, to rehearse on CPU
    env: tuple[tuple[str, str], ...] = ()  # added to the environment of this check only


def _smoke(optimizer: str, tokenizer: str, preset: str) -> tuple[str, ...]:
    """The reference config's smoke knobs (gin/gsm8k.gin header), offline: random weights."""
    bindings = [
        f"make_model.preset='{preset}'",
        f"make_model.tokenizer='{tokenizer}'",
        "make_dataset.source='synthetic'",
        "TrainConfig.num_steps=3",
        "TrainConfig.prompts_per_step=1",
        "make_sampling.max_new_tokens=64",
        "TrainConfig.eval_every_steps=0",
        f"make_optimizer.name='{optimizer}'",
    ]
    return ("grpo.main", "--gin_file=gin/gsm8k.gin", *(f"--gin_bindings={b}" for b in bindings))


def checks(tokenizer: str) -> list[Check]:
    """The plan, in priority order within each part. Part 1: the smoke run (the validation
    the issue asks for, and the quickest sign that the trainer works on this GPU at all), the
    rollout and MFU targets (MFU with cuDNN attention: the H200 roofline of einsum attention is
    0.44 at best, BUILD_NOTES), then LoRA's update if time is left; part 2: the adamw smoke
    run, the memory target (XLA's GPU compile already estimates it here), the update with einsum
    attention, the GPU tests; part 3: the update on completions of random lengths with and
    without width buckets (TrainConfig.micro_batch_width_buckets), with each prompt run once
    for its group (TrainConfig.shared_prompt_forward), and both together; part 4: the
    rollout of 8 samples per prompt with and without `make_sampling.shared_prompt_decode` and
    `decode_segments`, then the update over 512 kept ids per token
    (make_sampling.keep_sampling_mask); part 5: that rollout with a long tail of completion
    lengths, with and without segments and `compact_rows`, and the round after a tool call on
    the first round's cache against a fresh prefill; part 6: top-k sampling with and without
    its kept ids recorded. A call that starts a machine spends a minute or more of the
    session's 15 before part 1 begins."""
    update_1p5b = ("bench.update", "--preset=qwen2.5-1.5b", "--batch=64", "--prompt_len=256")
    # 4 micro-batches: the best H200 roofline that fits (BUILD_NOTES: update shape choices).
    update_1p5b += ("--completion_len=768", "--micro_batches=4", "--iters=2")
    update_tiny = ("bench.update", "--preset=tiny-qwen2", "--batch=8", "--prompt_len=16")
    update_tiny += ("--completion_len=16", "--micro_batches=2", "--iters=1")
    varied, varied_tiny = ("--min_completion_len=64",), ("--min_completion_len=2",)
    rollout_grouped = ("bench.rollout", "--preset=qwen2.5-1.5b", "--batch=128", "--num_samples=8")
    rollout_grouped += ("--prompt_len=256", "--new_tokens=1024", "--iters=2", "--mem_bw_gbps=4800")
    rollout_tiny = ("bench.rollout", "--preset=tiny-qwen2", "--batch=8", "--num_samples=4")
    rollout_tiny += ("--prompt_len=16", "--new_tokens=16", "--iters=1")
    return [
        Check(
            "smoke_lion",
            1,
            150,
            _smoke("lion", tokenizer, SMOKE_PRESET),
            _smoke("lion", tokenizer, "tiny-qwen2"),
        ),
        Check(
            "rollout",
            1,
            150,
            ("bench.rollout", "--preset=qwen2.5-0.5b", "--batch=256", "--prompt_len=128")
            + ("--new_tokens=256", "--hf_baseline", "--mem_bw_gbps=4800")
            + ("--profile_dir=/tmp/gpu_check_rollout_trace",),
            ("bench.rollout", "--preset=tiny-qwen2", "--batch=8", "--prompt_len=16")
            + ("--new_tokens=16", "--iters=1", "--hf_baseline")
            + ("--profile_dir=/tmp/gpu_check_rollout_trace",),
        ),
        Check(
            "update_cudnn",
            1,
            170,
            update_1p5b + ("--attention=cudnn", "--torch_baseline"),
            update_tiny + ("--attention=auto", "--torch_baseline"),  # cudnn needs a GPU
        ),
        Check(  # last of part 1, in what the three above leave: LoRA's step beside full's
            "update_lora",
            1,
            90,
            update_1p5b + ("--attention=cudnn", "--lora_rank=16"),
            update_tiny + ("--attention=auto", "--lora_rank=4"),
        ),
        Check(
            "smoke_adamw",
            2,
            120,
            _smoke("adamw", tokenizer, SMOKE_PRESET),
            _smoke("adamw", tokenizer, "tiny-qwen2"),
        ),
        Check(
            "step_memory",
            2,
            220,
            ("bench.step", "--preset=qwen2.5-1.5b", "--prompts=16", "--group=8")
            + ("--prompt_len=256", "--new_tokens=1024", "--micro_batches=16", "--beta=0.04")
            + ("--steps=1",),  # the trainer's default attention (xla): its memory is the target
            ("bench.step", "--preset=tiny-qwen2", "--prompts=2", "--group=4", "--prompt_len=16")
            + ("--new_tokens=16", "--micro_batches=2", "--beta=0.04", "--steps=1"),
        ),
        Check(
            "update_xla",
            2,
            130,
            update_1p5b + ("--attention=xla", "--profile_dir=/tmp/gpu_check_trace"),
            update_tiny + ("--attention=xla",),
        ),
        Check(
            "tests",
            2,
            90,
            ("pytest", "-q", "tests/models/test_cudnn.py", "tests/models/test_parity.py")
            + ("tests/models/test_mixed_precision.py", "tests/models/test_lora.py")
            + ("tests/phases/test_rollout.py",)
            + ("-k", "not smollm2 and not peft"),  # neither SmolLM2's GGUF nor peft is carried
            ("pytest", "-q", "tests/models/test_mixed_precision.py"),
            # fp32 parity tolerances assume fp32 matmuls; JAX on a GPU defaults to TF32.
            env=(("JAX_DEFAULT_MATMUL_PRECISION", "highest"),),
        ),
        # Part 3: length-sorted micro-batches at K widths against all at full width (8
        # micro-batches: the later flag wins).
        *(
            Check(
                f"update_width_buckets_{k}",
                3,
                100,
                update_1p5b
                + ("--attention=cudnn", "--micro_batches=8", *varied, f"--width_buckets={k}"),
                update_tiny + ("--attention=auto", *varied_tiny, f"--width_buckets={k}"),
            )
            for k in (1, 4)
        ),
        Check(  # each prompt run once for its 8 completions; part 2's update_xla runs each 8 times
            "update_shared_prompts",
            3,
            100,
            update_1p5b + ("--attention=xla", "--shared_prompts=8"),
            update_tiny + ("--attention=xla", "--shared_prompts=2"),
        ),
        # Both: whole groups sorted by their longest completion, at K widths against full width,
        # one group per micro-batch, lengths alike within a group as a prompt's completions run.
        *(
            Check(
                f"update_shared_width_buckets_{k}",
                3,
                100,
                update_1p5b
                + ("--attention=xla", "--shared_prompts=8", "--micro_batches=8", *varied)
                + ("--group_length_spread=0.25", f"--width_buckets={k}"),
                update_tiny
                + ("--attention=xla", "--shared_prompts=2", *varied_tiny)
                + ("--group_length_spread=0.25", f"--width_buckets={k}"),
            )
            for k in (1, 4)
        ),
        # Part 4: the reference rollout shape (8 samples per prompt, long completions) with the
        # decode's two opt-in knobs, each alone and both, against neither.
        *(
            Check(
                f"rollout_{decode}_segments_{segments}",
                4,
                100,
                rollout_grouped
                + (f"--shared_prompt_decode={decode == 'shared'}",)
                + (f"--decode_segments={segments}",),
                rollout_tiny
                + (f"--shared_prompt_decode={decode == 'shared'}",)
                + (f"--decode_segments={segments}",),
            )
            for decode in ("copied", "shared")
            for segments in (1, 4)
        ),
        Check(  # the keep sampling mask at a top_p bound of 512 ids, beside part 2's update_xla
            "update_kept_ids",
            4,
            100,
            update_1p5b + ("--attention=xla", "--kept_ids=512"),
            update_tiny + ("--attention=xla", "--kept_ids=8"),
        ),
        # Part 5: a long tail, as GRPO's completions run (one id in 333 ends a row: at evenly
        # spread probabilities, half the rows pass 256 tokens, a tenth 768): one loop, four
        # segments, and four segments decoding only the rows still going (`compact_rows`).
        *(
            Check(
                f"rollout_tail_{name}",
                5,
                budget,
                rollout_grouped + ("--end_rate=0.003", *knobs),
                rollout_tiny + ("--end_rate=0.1", *knobs),
            )
            for name, budget, knobs in (
                ("segments_1", 100, ()),
                ("segments_4", 110, ("--decode_segments=4",)),
                ("compact_rows", 170, ("--decode_segments=4", "--compact_rows")),
            )
        ),
        Check(  # the round after a tool call: on the first round's cache, against re-prefilled
            "rollout_tool_round",
            5,
            160,
            rollout_grouped + ("--appended=32", "--iters=1"),
            rollout_tiny + ("--appended=4",),
        ),
        # Part 6: the keep sampling mask's rollout cost, top-50 sampling recording its kept ids
        # against the same sampling without (its update cost: part 4's update_kept_ids).
        *(
            Check(
                f"rollout_top_k_{name}",
                6,
                100,
                rollout_grouped + ("--top_k=50", *knobs),
                rollout_tiny + ("--top_k=3", *knobs),
            )
            for name, knobs in (("alone", ()), ("kept_ids", ("--keep_sampling_mask",)))
        ),
    ]


def _last_json(output: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_check(check: Check, argv: tuple[str, ...], timeout_s: float, env: dict) -> dict:
    """Runs one check in its own process (own device memory); never raises."""
    workdir = tempfile.mkdtemp(prefix=f"gpu_check_{check.name}_")
    if argv[0] == "grpo.main":
        argv = (*argv, f"--workdir={workdir}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=ROOT,
            env={**env, **dict(check.env)},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        output = _text(err.stdout) + _text(err.stderr) + f"\n[timed out after {timeout_s:.0f} s]"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # checkpoints of large shapes fill the disk
    return {
        "check": check.name,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python -m " + " ".join(argv),
        "result": _last_json(output),
        "tail": output.splitlines()[-12:],
        "output": output,
    }


def _text(stream: bytes | str | None) -> str:
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


def _environment(tiny: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    # Shared by the checks: the two smoke runs compile the same rollout program.
    cache = os.path.join(tempfile.gettempdir(), "gpu-check-jax")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    if not tiny:
        env.setdefault("JAX_PLATFORMS", "cuda")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def save_tokenizer(path: str) -> None:
    """The offline SmolLM2 tokenizer as a small HF folder (the GGUF itself is too big to carry)."""
    from grpo.models import loading

    loading.load_tokenizer(loading.SMOLLM2_NAME).save_pretrained(path)
    # The class name every transformers version knows (the GPU machine's is older than ours).
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    print(f"tokenizer -> {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part", type=int, choices=(1, 2, 3, 4, 5, 6), default=None, help="default: all"
    )
    parser.add_argument("--only", default="", help="comma-separated check names")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check")
    parser.add_argument("--deadline_s", type=float, default=540, help="for this whole command")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: rehearse on CPU")
    parser.add_argument("--tokenizer", default=TOKENIZER_DIR)
    parser.add_argument("--save_tokenizer", default=None, help="write the tokenizer and exit")
    args = parser.parse_args(argv)
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer)
        return []

    plan = [c for c in checks(args.tokenizer) if args.part in (None, c.part)]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in checks(args.tokenizer)}
        if unknown:
            parser.error(f"unknown checks {sorted(unknown)}")
        plan = [c for c in plan if c.name in wanted]
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        parser.error(f"{args.tokenizer}: no tokenizer.json (run `make gpu-prep` here first)")

    os.makedirs(args.out, exist_ok=True)
    env = _environment(args.tiny)
    deadline = time.perf_counter() + args.deadline_s
    results = []
    with (
        open(os.path.join(args.out, "gpu_check.log"), "a") as log,
        open(os.path.join(args.out, "gpu_check.jsonl"), "a") as summary,
    ):
        log.write(_describe_machine(env))
        for check in plan:
            left = deadline - time.perf_counter()
            if left < MIN_USEFUL_S:
                record = {"check": check.name, "rc": None, "skipped": f"{left:.0f} s left"}
            else:
                argv = check.tiny_argv if args.tiny else check.argv
                record = run_check(check, argv, min(check.budget_s, left), env)
                log.write(f"\n===== {check.name}: {record['command']}\n{record.pop('output')}\n")
                log.flush()
            summary.write(json.dumps(record) + "\n")
            summary.flush()
            print(_one_line(record), flush=True)
            results.append(record)
    return results


def _one_line(record: dict) -> str:
    if "skipped" in record:
        return f"{record['check']}: skipped ({record['skipped']})"
    status = "ok" if record["rc"] == 0 else f"FAILED rc={record['rc']}"
    detail = json.dumps(record["result"]) if record["result"] else " | ".join(record["tail"][-3:])
    return f"{record['check']}: {status} in {record['seconds']} s: {detail}"


def _describe_machine(env: dict) -> str:
    probe = "import jax; print(jax.__version__, jax.devices())"
    lines = [f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} gpu_check"]
    for cmd in (["nvidia-smi", "-L"], [sys.executable, "-c", probe]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            lines.append(proc.stdout.strip() or proc.stderr.strip()[-500:])
        except (OSError, subprocess.TimeoutExpired) as err:
            lines.append(f"{cmd[0]}: {err}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(0 if all(r.get("rc") == 0 for r in main()) else 1)
