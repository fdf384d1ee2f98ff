"""Generated gRPC and protobuf modules: do not edit.

Regenerate with ``python -m rtbserve.transports.grpc.codegen`` (the sources are in ``proto/``);
``--check`` reports drift. ``predictor_pb2`` lives in protobuf's default descriptor pool; the
Open Inference Protocol's ``grpc_service_pb2`` (package ``inference``, which other libraries
also compile) lives in ``PRIVATE_POOL``.
"""

from google.protobuf import descriptor_pool as _descriptor_pool

PRIVATE_POOL = _descriptor_pool.DescriptorPool()
