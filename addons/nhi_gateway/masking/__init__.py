"""Masking: what a response must not show.

``masks`` applies the policy's mask profiles (fields, JSON paths, detectors; redacted, partly
shown or pseudonymised) to JSON, form and text bodies, whatever their Content-Encoding.

May import: the standard library only. Never ``addons``, ``proxy`` or ``cli``.
"""
