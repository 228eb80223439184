"""One module per screen of the app, each a ``build(studio, screen)`` that lays out its tab and wires its events to
public Studio methods (webapp/actions.py). ``screen`` (common.Screen) holds what the tabs share."""
