"""Built-in adapters of kdinpaint, installed as the import package ``kdinpaint_adapters``.

Each adapter is registered through the ``kdinpaint`` entry-point group, the same one third-party
plugins use.
"""
