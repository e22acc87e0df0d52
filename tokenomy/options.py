"""Option values written as text (`key=value` on the command line and in reducer specs), parsed one way everywhere."""


def parse_value(text: str):
    """'true'/'false' -> bool, 'none'/'null' -> None, then int, then float, else the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
