"""Build of the optional C kernel of the sparse gates; everything else is declared in pyproject.toml.

The extension is optional: where no C compiler is found, installation goes on and
``tensormoe.routing.gates`` computes the same values with array operations.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            "tensormoe.frameworks._sparse_gates",
            sources=["tensormoe/frameworks/_sparse_gates.c"],
            extra_compile_args=flags,
            libraries=[] if sys.platform == "win32" else ["pthread"],
            optional=True,
        )
    ]
)
