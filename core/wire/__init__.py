"""Wire formats shared by server, pruning and client: the stats file (``stats``), the plan
(``plan``) and HTTP bodies (``api``). Light on purpose: numpy, safetensors, pydantic only."""
