"""The network code every stage that runs a network shares: backbones, the MaskContrast decoder
and heads (``model``), pretrained weight loading (``init``), where and in what precision a network
runs and how its input is laid out (``runtime``), and the same choice made at plan time without
torch (``compute``).

Train, masks, extract and segment import these modules; none of them imports another stage's
internals for them. Nothing is re-exported here, so that ``compute`` stays importable without
torch.
"""
