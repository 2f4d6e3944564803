"""
Blobs and manifests shared by several nodes in S3-compatible object storage
(AWS S3, Ceph RGW, MinIO): the layer under ``[cache] backend = s3``.

``objects``' :class:`~regmirror.s3.objects.ObjectStore` speaks the few S3
operations the cache needs over an injected ``IAgent``, each request signed
with AWS Signature Version 4 by botocore's signer (``signing``: only its
signer, no boto session, no threads).  Bodies stream (``bodies``): a file
is sent in slices of known length read in small chunks, and large files go
up as multipart uploads, aborted when anything fails.  ``shared``'s
:class:`~regmirror.s3.shared.SharedStore` keeps blobs and manifests under
their digests on top of it.  ``location`` says where the bucket is and
with which credentials; ``errors`` holds what a failed operation raises.

Credentials are revealed only to the signer.  They appear in no exception,
``repr`` or log line; a presigned URL carries a signature made with them and
is for the client it is handed to, never for a log.
"""

__all__ = ["bodies", "errors", "location", "objects", "shared", "signing"]
