"""Walks jaxprs, nested ones (scan, while, cond, pjit, custom_vjp) included."""

from collections.abc import Iterator

from jax.extend import core


def all_eqns(jaxpr: core.Jaxpr) -> Iterator[core.JaxprEqn]:
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from all_eqns(sub)
