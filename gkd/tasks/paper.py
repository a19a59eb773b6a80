"""The paper's tasks over TFDS: XSum, WMT14 en->de, GSM8K (filled in next)."""
