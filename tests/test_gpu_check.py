"""The GPU-session plan stays runnable: every command's flags and gin bindings are accepted here,
the parts fit one device call, and the driver records skipped checks instead of starting them.

A typo found on the device costs minutes of a 15-minute budget; found here it costs nothing.
(The whole plan on tiny shapes runs with `python -m bench.gpu_check --tiny`, about 90 s.)
"""

import json
import os

import pytest
from absl import flags

import gin
from bench import gpu_check, step, update
from grpo import main as grpo_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = gpu_check.checks(tokenizer=".gpu/tokenizer")
COMMANDS = [(c.name, argv) for c in PLAN for argv in (c.argv, c.tiny_argv)]


def test_each_part_fits_one_device_call():
    assert len({c.name for c in PLAN}) == len(PLAN)
    for part in (1, 2, 3, 4, 5, 6):
        budget = sum(c.budget_s for c in PLAN if c.part == part)
        assert 0 < budget <= 600 - 40, f"part {part} plans {budget} s; one call may run 600 s"


@pytest.mark.parametrize("name, argv", COMMANDS)
def test_command_is_accepted(name, argv):
    module, args = argv[0], list(argv[1:])
    if module in ("bench.update", "bench.step"):
        {"bench.update": update, "bench.step": step}[module].parse_args(args)
    elif module == "bench.rollout":
        import bench.rollout  # noqa: F401  (defines its absl flags)

        names = [a.removeprefix("--").split("=")[0] for a in args]
        assert all(n in flags.FLAGS for n in names), names
    elif module == "grpo.main":
        bindings = [a.removeprefix("--gin_bindings=") for a in args if "gin_bindings" in a]
        gin.clear_config()
        try:
            grpo_main.parse_gin(["gin/gsm8k.gin"], bindings, [ROOT])
        finally:
            gin.clear_config()
    elif module == "pytest":
        paths = [a for a in args if a.endswith(".py")]
        assert paths and all(os.path.isfile(os.path.join(ROOT, p)) for p in paths), paths
    else:
        pytest.fail(f"{name}: no check for module {module}")


def test_driver_skips_what_does_not_fit_and_records_it(tmp_path):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    results = gpu_check.main(
        ["--part=1", f"--out={tmp_path}", "--deadline_s=0", f"--tokenizer={tokenizer}"]
    )
    assert [r["check"] for r in results] == [c.name for c in PLAN if c.part == 1]
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    assert [json.loads(line)["rc"] for line in lines] == [None] * len(results)
    assert all("skipped" in json.loads(line) for line in lines)


def test_driver_refuses_a_missing_tokenizer_before_running_anything(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main([f"--out={tmp_path}", f"--tokenizer={tmp_path / 'none'}"])
    assert not (tmp_path / "gpu_check.jsonl").exists()


def test_saved_tokenizer_loads_and_matches_the_offline_one(tmp_path):
    from grpo.models import loading

    gpu_check.save_tokenizer(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    saved, original = (loading.load_tokenizer(p) for p in (str(tmp_path), loading.SMOLLM2_NAME))
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}]
    encode = lambda tok: tok.apply_chat_template(messages, add_generation_prompt=True)
    assert encode(saved) == encode(original)
    assert (len(saved), saved.eos_token_id) == (len(original), original.eos_token_id)
