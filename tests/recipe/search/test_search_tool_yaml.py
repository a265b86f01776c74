"""The shipped tool yaml builds through verl's own tool loader and honours RETRIEVER_URL."""

from pathlib import Path

from verl.tools.tool_registry import initialize_tools_from_config

from recipe.carl.search.search_tool import CarlSearchTool

YAML = Path(__file__).resolve().parents[3] / "recipe" / "carl" / "search" / "search_tool.yaml"


def test_tool_yaml_builds_with_retriever_url_from_env(monkeypatch):
    monkeypatch.setenv("RETRIEVER_URL", "http://10.1.2.3:9000/retrieve")
    (tool,) = initialize_tools_from_config(str(YAML))
    assert isinstance(tool, CarlSearchTool)
    assert tool.settings["retrieval_service_url"] == "http://10.1.2.3:9000/retrieve"
    assert tool.name == "search" and tool.settings["topk"] == 3
    assert tool.client.limits.max_connections == tool.client.limits.max_keepalive_connections == 256


def test_tool_yaml_default_url(monkeypatch):
    monkeypatch.delenv("RETRIEVER_URL", raising=False)
    (tool,) = initialize_tools_from_config(str(YAML))
    assert tool.settings["retrieval_service_url"] == "http://127.0.0.1:8000/retrieve"
