"""DICOM status codes the gateway returns (PS3.4 Annex B, C, J; PS3.7 Annex C)."""

from __future__ import annotations

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING_SUBOPS_FAILED = 0xB000  # C-MOVE/C-GET: one or more sub-operations failed
OUT_OF_RESOURCES = 0xA700  # C-STORE: the archive is full, or its object store is unreachable
OUT_OF_RESOURCES_SUBOPS = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # C-FIND/MOVE/GET: identifier does not match SOP class
CANNOT_UNDERSTAND = 0xC000  # C-STORE: the dataset cannot be parsed
MALFORMED_DATASET = 0xC210  # C-STORE: required attributes missing or unreadable dataset
STORE_FAILED = 0xC211  # C-STORE: the archive could not store it (see the log)
UNABLE_TO_PROCESS = 0xC001  # C-FIND/MOVE/GET
PROCESSING_FAILURE = 0x0110  # N-ACTION
NO_SUCH_SOP_INSTANCE = 0x0112  # storage commitment FailureReason: never received here
CLASS_INSTANCE_CONFLICT = 0x0119  # storage commitment FailureReason: held under another class
NO_SUCH_ACTION_TYPE = 0x0123  # N-ACTION
