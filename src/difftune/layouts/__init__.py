"""Original checkpoint layouts, the parts families share: renaming rules and their checks
(rules), and the text encoders' layouts (text_encoders: OpenAI CLIP, OpenCLIP). Each
family's own layout is in its folder (families/sd/single_file.py)."""
