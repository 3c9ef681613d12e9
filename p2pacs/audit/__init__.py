"""The IHE ATNA audit trail: DICOM audit messages (PS3.15 A.5) over syslog, and a local log.

``messages`` builds the XML, ``translate`` maps site events to messages, ``syslog`` frames and
sends them (RFC 5424/5425/5426), ``log`` is the fsync'd local log that is also the outbox, and
``trail`` runs it all on one thread behind the site's event bus.
"""

from p2pacs.audit.trail import AuditTrail, TrailSettings
from p2pacs.audit.translate import Local, StudyInfo

__all__ = ["AuditTrail", "Local", "StudyInfo", "TrailSettings"]
