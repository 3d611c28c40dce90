"""Analyses over jaxprs: loop invariance (:mod:`.invariance`) and a FLOP/byte cost model (:mod:`.cost`)."""
