"""A tiny capability, registered only in the tests: the worked example of docs/architecture.md.

Kind ``linefit`` fits the slope of a line by gradient descent. Everything a capability needs is here: a folder,
a section model (:mod:`example_kind.config`), a runner and one verb (:mod:`example_kind.fit`), and one
registration line (``registry.register(CAPABILITY)`` in the tests; an entry point in a package).
"""
