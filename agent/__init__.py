"""edgesdk's on-device agent: serves models, installs bundles safely, reports to the fleet.

Device-side: importing ``agent`` never imports TensorFlow (a test guards it).
"""

from .client import AgentClient
from .config import AgentConfig, load_config
from .daemon import Agent

__all__ = ["Agent", "AgentClient", "AgentConfig", "load_config"]
