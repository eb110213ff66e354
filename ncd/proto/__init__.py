"""ProtoAnomalyNCD (PROTO.md): region guidance, object prior, prototype losses, K estimation, open set.

Import from the submodules, e.g. ``from ncd.proto.losses import proto_criterion``.
"""
