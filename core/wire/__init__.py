"""Wire formats shared by server, pruning and client: the stats file (``stats``; merged by
``stats_merge``), the plan (``plan``), the request for one (``plan_request``) and HTTP bodies
(``api``). Light on purpose: numpy, safetensors, pydantic only."""
