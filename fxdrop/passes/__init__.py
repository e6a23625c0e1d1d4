"""The fx pass: trace (:mod:`.trace`, :mod:`.spec`) -> normalise (:mod:`.normalise`) -> plan (:mod:`.plan`)
-> rewrite (:mod:`.rewrite`, with an emitter per conversion path)."""
