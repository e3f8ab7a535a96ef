"""ONNX Runtime's contrib ``com.microsoft.MultiHeadAttention`` for the exporter.

runtimes.attention's ``dewey::mha`` custom op (mask-free attention on [B, S, H*D] tensors) is lowered
to this op for graphs meant for ONNX Runtime on CPU, whose flash kernel then keeps global attention
linear in memory. onnxscript knows no contrib schemas, so the schema is registered with onnx first.
"""

from __future__ import annotations

MSFT_DOMAIN = "com.microsoft"


def register_mha_schema() -> None:
    from onnx import defs

    try:
        defs.get_schema("MultiHeadAttention", 1, MSFT_DOMAIN)
        return
    except defs.SchemaError:
        pass
    param = defs.OpSchema.FormalParameter
    attribute = defs.OpSchema.Attribute
    schema = defs.OpSchema(
        "MultiHeadAttention",
        MSFT_DOMAIN,
        1,
        doc="ONNX Runtime contrib multi-head attention (query, key, value: [B, S, H*D]); no mask used here.",
        inputs=[param("query", "T"), param("key", "T"), param("value", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[
            attribute("num_heads", defs.OpSchema.AttrType.INT, "number of heads"),
            attribute("scale", defs.OpSchema.AttrType.FLOAT, "score scale, 1/sqrt(head size) of the real head"),
        ],
    )
    defs.register_schema(schema)


def translation_table() -> dict:
    """``custom_translation_table`` for torch.onnx.export: dewey::mha -> com.microsoft.MultiHeadAttention."""
    import torch
    from onnxscript.values import Opset

    import runtimes.attention  # noqa: F401  (defines torch.ops.dewey.mha)

    register_mha_schema()
    msft = Opset(MSFT_DOMAIN, 1)

    def multi_head_attention(query, key, value, num_heads: int, scale: float):
        return msft.MultiHeadAttention(query, key, value, num_heads=num_heads, scale=scale)

    return {torch.ops.dewey.mha.default: multi_head_attention}
