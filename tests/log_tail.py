"""The end of a subprocess's log for an assertion message, less XLA's SPMD partitioner warnings:
an update on tiny.gin's 2 x 2 x 2 mesh logs dozens of "Involuntary full rematerialization"
lines per compile (BUILD_NOTES, pitfalls), and they filled the 3,000 characters a CI failure
showed of a segfaulted run."""

NOISE = ("spmd_partitioner.cc",)


def log_tail(text: str, chars: int = 3000) -> str:
    kept = [line for line in text.splitlines() if not any(mark in line for mark in NOISE)]
    return "\n".join(kept)[-chars:]
