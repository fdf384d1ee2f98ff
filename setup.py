"""The one C extension; everything else about the package is in pyproject.toml.

``rtbserve.codecs._csv_fast`` is an optional speed-up: when it cannot be built (no C compiler),
the install still succeeds and ``csv_codec`` uses its pure-Python parser.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rtbserve.codecs._csv_fast",
            sources=["rtbserve/codecs/_csv_fast.c"],
            optional=True,
        )
    ]
)
