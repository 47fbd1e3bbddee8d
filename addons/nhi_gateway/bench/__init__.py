"""The benchmark (``scripts/bench``): the gateway against bare mitmdump, same load, same run.

- :mod:`.run` starts the look-alike, an upstream, bare mitmdump and the gateway, and measures;
- :mod:`.load` is the load generator (HTTPS through CONNECT, keep-alive or a new connection per
  request);
- :mod:`.upstream` is the cheap upstream that replays the look-alike's answer;
- :mod:`.launch` starts both proxies with graph.microsoft.com resolved to the loopback upstream;
- :mod:`.policies` generates realistic policies of any size; :mod:`.decisions` times
  ``Policy.decide`` for 10 against 5,000 rules;
- :mod:`.grants` measures what a grant looked up in PostgreSQL adds to a request, on a server
  :mod:`.postgres` finds as the tests find theirs;
- :mod:`.profile` samples the gateway with py-spy under load;
- :mod:`.report` prints the tables, the ratios and the targets of issue 7.
"""
