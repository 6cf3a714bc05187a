"""Old execution (opt_einsum's cached contract_expression) vs the lowered program, same path search, one run."""
import time, numpy as np, opt_einsum as oe, tensormoe as tm
from tensormoe.ops import get_ops
def t(f, n=200):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return np.min(ts)*1e3
rng = np.random.default_rng(0)
print("| backend | layer | B | opt_einsum expression (ms, min) | lowered program (ms, min) | speed-up |")
print("|---|---|---|---|---|---|")
for be in ("numpy", "pytorch"):
    tm.set_backend(be); ops = get_ops(be)
    for name, make in [("cp", lambda: tm.CPMMoE(768,768,[1024],rank=256)), ("tucker", lambda: tm.TuckerMMoE(768,768,[1024],ranks=[64,64,64])),
                       ("tt", lambda: tm.TTMMoE(768,768,[1024],ranks=[1,32,32,1])), ("tr", lambda: tm.TRMMoE(768,768,[1024],ranks=[8,16,16]))]:
        layer = make(); p = layer.params
        for B in (1, 64):
            x = ops.asarray(rng.standard_normal((B, 768)).astype("float32"))
            operands = [*layer.coefficients(p, x), ops.concat_ones(x), *(p[k] for k in layer.factorization.network())]
            eq = layer.factorization.forward_equation()
            shapes = [tuple(o.shape) for o in operands]
            ops.contract(eq, operands)  # plan + tune
            plan = tm.get_plan(eq, *shapes, backend=be)
            expr = oe.contract_expression(eq, *shapes, optimize=oe.contract_path(eq, *shapes, shapes=True)[0])
            bk = ops.einsum_backend
            old = t(lambda: expr(*operands, backend=bk)); new = t(lambda: plan(*operands, backend=be))
            print(f"| {be} | {name} | {B} | {old:.3f} | {new:.3f} | {old/new:.1f}x |")
