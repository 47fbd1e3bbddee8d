"""Recording: what happened, for whoever reviews it.

``flows`` writes each flow (refused ones too) in mitmproxy's own format with the review
annotations mitmweb shows; ``files`` names, rotates and repairs the files; ``process`` runs that
writing in a child process; ``flowformat`` is a fast tnetstring encoder; ``redaction`` keeps
credentials off disk; ``audit`` is the hash-chained JSON-lines audit trail.

May import: ``policy`` (the decision a flow carries), ``masking`` and mitmproxy's flow types.
Never ``addons``, ``proxy`` or ``cli``.
"""
