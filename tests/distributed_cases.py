"""The cases of the distributed tests, shared by the pytest process (one-process references) and the workers.

Every parameter is random (factors, cores, gates), drawn from a seed per case;
the data are random too.  Nothing here imports torch or jax at import time.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import zlib

import numpy as np

import tensormoe
from tensormoe.routers import TopKRouter

IN_DIM, OUT_DIM, EXPERTS = 10, 6, 8
#: ranks per format; the default split rank (CP rank, Tucker output rank, TT/TR bond r_2) is 4
FORMATS = {
    "cp": 4,
    "tucker": [3, 2, 4],
    "tt": [1, 3, 4, 1],
    "tr": [2, 3, 4, 2],
}
#: "dense": the MMoE's own entmax15 gate; "top2": top-2 routing without training noise (deterministic)
ROUTERS = {"dense": None, "top2": TopKRouter(k=2, noise=None)}
CASES = [(fmt, router) for fmt in FORMATS for router in ROUTERS]
#: JAX compiles each case's programs (about a second each on 2 busy cores): every format with the dense gate,
#: top-2 routing on CP (and on TR on the 2 x 2 mesh)
JAX_CASES = [(fmt, "dense") for fmt in FORMATS] + [("cp", "top2")]

ROWS = 8  # rows per step, all workers together
STEPS = 3
LR, MOMENTUM = 0.05, 0.9


ROOT = pathlib.Path(__file__).resolve().parents[1]


def launch(command: list[str], out: pathlib.Path, timeout: float, env: dict[str, str] | None = None, meanwhile=None):
    """Run ``command`` (which writes ``out/results.npz``) in its own process group; kill the group when done.

    ``meanwhile()`` runs in this process while the command does (the one-process
    references).  Returns the loaded results; fails the test with the log's tail
    on a non-zero exit or after ``timeout`` seconds.
    """
    import time

    import pytest

    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    log_path = out / "log.txt"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if meanwhile is not None:
                meanwhile()
            code = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:  # the launcher's workers too, whatever state they are in
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    tail = log_path.read_text()[-6000:]
    if code is None:
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s (killed); its output ended:\n{tail}")
    if code != 0 or not (out / "results.npz").is_file():
        pytest.fail(f"{' '.join(command)} exited with {code}; its output ended:\n{tail}")
    return dict(np.load(out / "results.npz"))


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def functional_layer(fmt: str, router: str, dtype: str = "float64") -> tensormoe.MMoE:
    """The case's functional layer, every parameter drawn from N(0, 0.5^2) (gates too)."""
    layer = tensormoe.layer.make_layer(fmt, IN_DIM, OUT_DIM, [EXPERTS], FORMATS[fmt], router=ROUTERS[router], dtype=dtype)
    rng = np.random.default_rng(_seed("params", fmt, router))
    with tensormoe.backend_context("numpy"):
        layer.params = {name: (0.5 * rng.normal(size=shape)).astype(dtype) for name, shape in layer.param_shapes().items()}
    return layer


def batch(step: int, dtype: str = "float64", rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``x[rows, IN_DIM]`` and targets ``t[rows, OUT_DIM]`` of one step."""
    rng = np.random.default_rng(_seed("batch", step, rows))
    return rng.normal(size=(rows, IN_DIM)).astype(dtype), rng.normal(size=(rows, OUT_DIM)).astype(dtype)


# --------------------------------------------------------------------------- PyTorch
def torch_model(fmt: str, router: str):
    """A module whose forward returns ``(y, routing)`` (DDP and FSDP2 hook the module they wrap)."""
    import torch

    from tensormoe.torch import wrap

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mmoe = wrap(functional_layer(fmt, router))

        def forward(self, x):
            return self.mmoe.layer.apply(dict(self.mmoe.params), x, return_routing=True, backend="pytorch")

    return Model()


def torch_loss(y, routing, t, router: str, sync=None):
    """Mean squared error over the rows, plus the auxiliary losses of top-2 routing (``sync`` makes them global)."""
    from tensormoe.routers import aux_loss

    loss = ((y - t) ** 2).sum(-1).mean()
    if router == "top2":
        loss = loss + aux_loss(sync(routing) if sync else routing)
    return loss


def torch_train(model, fmt: str, router: str, rows: slice = slice(None), sync=None, reduce_loss=None, device="cpu"):
    """``STEPS`` SGD steps (momentum) on the rows ``rows`` of every batch; returns the losses and the optimizer."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        x, t = (torch.from_numpy(a[rows]).to(device) for a in batch(step))
        y, routing = model(x)
        loss = torch_loss(y, routing, t, router, sync)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        losses.append(float(reduce_loss(value) if reduce_loss else value))
    return losses, opt


def torch_reference(fmt: str, router: str) -> tuple[list[float], dict[str, np.ndarray]]:
    """One process, the whole batch: the losses and the final parameters."""
    model = torch_model(fmt, router)
    losses, _ = torch_train(model, fmt, router)
    return losses, {name: p.detach().numpy() for name, p in model.mmoe.params.items()}


# --------------------------------------------------------------------------- JAX
def jax_layer(fmt: str, router: str):
    """The case's JAX layer in float32 (the JAX tests keep x64 off)."""
    from tensormoe.jax import wrap

    return wrap(functional_layer(fmt, router, dtype="float32"))


def jax_loss(layer, x, t, router: str):
    """Mean squared error plus the auxiliary losses of top-2 routing (the whole batch: the program is global)."""
    import jax.numpy as jnp

    from tensormoe.routers import aux_loss

    y, routing = layer.layer.apply(layer.params, x, return_routing=True, backend="jax")
    loss = jnp.mean(jnp.sum((y - t) ** 2, axis=-1))
    return loss + aux_loss(routing) if router == "top2" else loss


def jax_sgd(loss_fn):
    """One jitted SGD step ``(layer, x, t) -> (loss, layer)`` of ``loss_fn(layer, x, t)`` (no momentum)."""
    import jax

    def step(layer, x, t):
        loss, grads = jax.value_and_grad(loss_fn)(layer, x, t)
        return loss, jax.tree_util.tree_map(lambda p, g: p - LR * g, layer, grads)

    return jax.jit(step)


def jax_train(step, layer, place):
    """``STEPS`` steps of the compiled ``step`` on ``place(x, t)``: the losses, the final layer, the compiled program."""
    x, t = place(*batch(0, "float32"))
    compiled = step.lower(layer, x, t).compile()
    losses = []
    for k in range(STEPS):
        x, t = place(*batch(k, "float32"))
        loss, layer = compiled(layer, x, t)
        losses.append(float(loss))
    return losses, layer, compiled
