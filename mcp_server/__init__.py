"""An MCP server for AI agents to search and change a task database, every change audited."""

__version__ = "0.1.0"
