"""The passes: :mod:`.licm` (hoisting, fission, speculation) and the pipeline that runs them."""
