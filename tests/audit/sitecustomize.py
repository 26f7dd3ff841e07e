"""Imported by every Python process started with tests/audit on PYTHONPATH: installs the collective audit
(tests/audit/collective_audit.py) when EXPBLIP_AUDIT_COLLECTIVES names a directory."""

import os

if os.environ.get("EXPBLIP_AUDIT_COLLECTIVES"):
    import collective_audit

    collective_audit.install(os.environ["EXPBLIP_AUDIT_COLLECTIVES"])
