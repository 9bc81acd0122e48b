"""A plugin with a typo in its hook name; check_pending must reject it."""
from llmgraft import hookimpl


@hookimpl
def llmgraft_register_samplerz(register):
    raise AssertionError("never called")
