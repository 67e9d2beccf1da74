"""The composition root: the ``edgefl`` command line and the demo.

It is the only package that may import every other one. The command groups
(``broker``, ``node``, ``fleet``, ``cloud``, ``fl``, ...) live in their own
packages and are found through the ``edgefl.commands`` entry points, each
imported only when it is used: a device that installed ``edgefl[edge]`` runs
``edgefl node`` without the cloud's dependencies.
"""
