"""Built-in adapters of kdinpaint, installed as the import package ``kdinpaint_adapters``.

One subpackage per adapter family (``gatedconv``, ``edgeconnect``, ``structureflow``, ``reference``, ``tiny``,
...): its modules hold one concept each (networks, official weights, losses), and its ``__init__`` holds the
adapter's spec and registers it through the ``kdinpaint`` entry-point group, the same one third-party
plugins use.
"""
