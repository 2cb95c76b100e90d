"""The wire contract (``l2o.proto``, package ``l2o.v1``) and its generated stubs.

Regenerate the stubs from the repository root after editing ``l2o.proto`` (see ``README.md``)::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/l2o.proto
"""
