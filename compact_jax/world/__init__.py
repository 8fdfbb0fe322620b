"""The tiny world: procedurally drawn scenes whose questions need exactly k capabilities.

Every one of COMPACT's ten atomic capabilities has a visual counterpart in the
scene graph (`scene.py`), drawn by `render.py`, and enters questions
(`questions.py`) as a query, a filter or a relation:

| capability           | in the picture                          | filter / relation            | query (answers)                          |
|----------------------|-----------------------------------------|------------------------------|------------------------------------------|
| color                | fill of an outlined object (6 colours)  | "the red ..."                | colour (red, orange, ...)                |
| shape                | geometric form: circle, square, ...     | "the triangle"               | shape (circle, ...)                      |
| object_recognition   | pixel-art sprite: car, tree, house, ... | "the car"                    | kind of object (car, ...)                |
| text_recognition     | a 5x5 letter on a plate on the object   | "with the letter k"          | letter (e, h, k, ...)                    |
| action_recognition   | object shifted, speed streaks behind it | "moving left", "moving"      | which way it goes (left, right, up, down)|
| spatial_recognition  | the quadrant of the frame               | "in the top left"            | part of the picture (top left, ...)      |
| counting             | how many objects fit a description      | (never a constraint)         | how many (1, 2, ...)                     |
| spatial_relationship | row/column order of two objects         | "to the left of the car"     | where A is compared to B (left, above...); how two objects line up (k=1) |
| object_interaction   | a rope drawn between two objects        | "tied to the car"            | is A tied to B / are any tied (yes, no)  |
| scene_understanding  | the ground: grass, water, sand, snow, road (one ground, or a patch of a second) | "on the sand" | ground under an object; the place (k=1, one ground) |

Design choices that depart from the obvious:
- The ground is local (a base ground plus, often, a rectangular patch of another),
  so scene_understanding can be a constraint ("the car on the sand"). A single
  global background could only ever be asked about alone: as a constraint it would
  be a presupposition that the answer never depends on.
- Spatial relations are read along rows and columns ("left of the car" = in the
  car's row, to its left), as one reads a grid.
- Objects are outlined in a dark ink and sprites carry dark details, so form does
  not depend on fill colour (the calibration prototype's shapes stayed at chance).

A question needs exactly its capabilities (`verify.py`): every listed one is
necessary (dropping its constraints changes or blurs the answer), no unlisted one
matters (perturbing only unlisted features keeps the answer), and the answer is not
predictable from the text. `compose.py` finds such questions, planting minimal-pair
distractors where needed (`plant.py`); `generate.py` is the ``generate`` stage.
"""
