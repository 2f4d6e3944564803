"""
What a failed S3 operation raises.
"""

from __future__ import annotations


class S3Error(Exception):
    """
    An S3 operation failed.

    :ivar operation: the S3 API name (``PutObject``, ``UploadPart``, …).
    :ivar key: the object key, or the bucket for bucket operations.
    :ivar code: S3's error ``Code`` (``NoSuchKey``, ``AccessDenied``, …),
        when it sent one.
    :ivar status: the HTTP status, when there was an answer.
    """

    def __init__(
        self,
        operation: str,
        key: str,
        code: str | None = None,
        status: int | None = None,
        detail: str | None = None,
    ) -> None:
        what = code or detail or "failed"
        if code and detail:
            what = f"{code}: {detail}"
        answered = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"S3 {operation} {key!r}: {what}{answered}")
        self.operation = operation
        self.key = key
        self.code = code
        self.status = status

    def __str__(self) -> str:
        # KeyError (a base of NoSuchKey) would quote the message.
        return str(self.args[0])


class NoSuchKey(S3Error, KeyError):
    """The object does not exist (404)."""
