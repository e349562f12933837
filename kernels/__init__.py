"""zipserve's attention and compression kernels.

Each kernel sits in the module of its concept beside a plain-torch reference with the same signature
(`*_ref`); the reference is the oracle in tests and the implementation of `backend="torch"`.

This package is zipserve's own. transformers probes for an unrelated optional package also called
`kernels` (the Hugging Face kernel hub); we expose no distribution metadata under that name and the
marker below lets a test prove the two are never confused.
"""

ZIPSERVE_KERNELS = True
