"""The sections of the suite, each a function ``section(be, cfg, out)`` that appends its rows to ``out[name]``.

1. ``limit``     planned forward (``layer.apply``, gates included) and forward+backward vs
                 the **limit**: the fastest exact gate written without tensormoe
                 (``benchmarks/limit_gates.py``: the ``entmax`` package, sort and partial-sort
                 thresholds, jitted Newton; each checked exact, the fastest kept), the
                 framework's own LayerNorm and the hand-ordered matmul chain
                 (``benchmarks/chains.py``), checked equal to the layer first; also against the
                 same chain with tensormoe's gates ("same gates") and against the layer's FLOPs
                 at the machine's measured matmul rate;
2. ``unplanned`` vs the same forward through the framework's einsum with defaults
                 (``torch.einsum``; ``jnp.einsum`` eager and jitted; ``tl.einsum`` =
                 ``np.einsum`` without a path, in a subprocess with a timeout);
                 ``overhead`` (2b) the contraction alone per call at batch 1;
3. ``dense``     vs the dense reference ``layer.dense_forward`` at growing expert counts;
4. ``linear``    vs a parameter-matched linear layer and a plain ``I x O`` one, forward
                 and forward+backward;
5. ``million``   the million-expert CP layer (``expert_dims=[1024, 1024]``) vs its limit
                 and a linear layer, with its FLOP breakdown and the forward's peak memory;
6. ``scaling``   time and time per FLOP against the number of experts (one and two levels),
                 the batch and the rank, with the limit (PNG);
plus ``gates``:  each gate activation (and the limit's candidates) against softmax;
``peers``:       nn.Linear, lucidrains' mixture-of-experts, PEER, Soft MoE and a path without
                 tensormoe (``torch.einsum`` + the ``entmax`` package) at matched parameters
                 (PyTorch; ``pip install .[peers]``);
``compile``:     ``torch.compile(fullgraph=True)`` of the modules against eager, and what the
                 graph holds;
``firstcall``:   what a first call costs: a new layer (its one plan search) and a new batch size.
"""

from __future__ import annotations

from sections.compile import section_compile
from sections.dense import section_dense
from sections.firstcall import section_firstcall
from sections.gates import section_gates
from sections.limit import section_limit
from sections.linear import section_linear
from sections.million import rss_worker, section_million
from sections.peers import section_peers
from sections.scaling import section_scaling
from sections.unplanned import einsum_worker, section_overhead, section_unplanned

#: Every section by its ``--sections`` name, in the order they run
SECTIONS = {"limit": section_limit, "unplanned": section_unplanned, "overhead": section_overhead,
            "dense": section_dense, "linear": section_linear, "million": section_million, "scaling": section_scaling,
            "gates": section_gates, "peers": section_peers, "compile": section_compile,
            "firstcall": section_firstcall}

#: What a fresh process runs for a section (``run.py --worker NAME``): one case in, one JSON-able dict out
WORKERS = {"unplanned-numpy": einsum_worker, "rss": rss_worker}
