"""Ray Train's checkpoint storage on S3, with the workers' credentials.

Ray pickles ``RunConfig.storage_filesystem`` into every process that touches storage (its controller and every
worker) before expblip's code runs there. Keys passed to the filesystem would be pickled with it, into Ray's
metadata. This filesystem carries only the endpoint and, on a local cluster, the path of the credentials file
(expblip.credentials): it loads that file when it is built, in the process that unpickles it, and otherwise finds
keys as s3fs does (the process's environment, an instance profile).
"""

from __future__ import annotations

import s3fs

from expblip.credentials import load_credentials
from expblip.data.shards import s3_endpoint


class CredentialedS3(s3fs.S3FileSystem):
    """s3fs that first loads the credentials file it names (if any); the endpoint comes from $AWS_ENDPOINT_URL."""

    def __init__(self, *args, credentials: str = "", **kwargs):
        load_credentials(credentials or None)
        endpoint = s3_endpoint()
        if endpoint:
            kwargs.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
        super().__init__(*args, **kwargs)  # fsspec pickles the arguments given, so `credentials` travels as a path
