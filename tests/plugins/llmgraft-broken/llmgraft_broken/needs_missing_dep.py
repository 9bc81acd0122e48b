"""A plugin whose import fails (a dependency that is not installed)."""
import a_dependency_that_is_not_installed  # noqa: F401
