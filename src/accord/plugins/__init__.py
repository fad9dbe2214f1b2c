"""Built-in plugins: each one a small, complete use of accord's primitives.

Import them from their modules, e.g. `from accord.plugins.token_policy import TokenPolicyPlugin`.
"""
