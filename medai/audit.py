"""The audit log's vocabulary: every action the store accepts, and how a row's detail reads for people."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class AuditAction(StrEnum):
    LOGIN_OK = "login_ok"
    LOGIN_FAILED = "login_failed"
    LOGIN_LOCKED = "login_locked"
    LOGOUT = "logout"
    ACCESS_DENIED = "access_denied"
    ANALYSIS = "analysis"
    THRESHOLDS_CHANGED = "thresholds_changed"  # the reader re-decided an analysis at their own thresholds
    USER_CREATED = "user_created"
    ROLE_CHANGED = "role_changed"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    USER_UNLOCKED = "user_unlocked"
    PASSWORD_RESET = "password_reset"
    SETTING_CHANGED = "setting_changed"
    TRAINING_LAUNCH = "training_launch"
    TRAINING_CANCEL = "training_cancel"
    TRAINING_RESUME = "training_resume"
    MODEL_REGISTERED = "model_registered"
    BACKUP_CREATED = "backup_created"
    BACKUP_VERIFIED = "backup_verified"
    BACKUP_VERIFY_FAILED = "backup_verify_failed"
    BACKUP_RESTORED = "backup_restored"
    BACKUP_DELETED = "backup_deleted"
    BACKUP_PRUNED = "backup_pruned"
    RESTORE_INTERRUPTED = "restore_interrupted"
    RESTORE_APPLIED = "restore_applied"
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    API_CALL = "api_call"
    API_AUTH_FAILED = "api_auth_failed"
    PACS_RECEIVED = "pacs_received"
    PACS_SKIPPED = "pacs_skipped"
    PACS_ANALYSED = "pacs_analysed"
    PACS_SENT = "pacs_sent"
    PACS_SEND_FAILED = "pacs_send_failed"
    PACS_RESEND = "pacs_resend"
    PACS_OPENED = "pacs_opened"
    PACS_PRUNED = "pacs_pruned"


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(detail: dict[str, Any]) -> str:
    """A row's detail as 'key: value; key: value' (nested values flattened), not a Python dict."""
    return "; ".join(f"{key.replace('_', ' ')}: {_value(value)}" for key, value in detail.items()
                     if value not in (None, "", [], {}))
