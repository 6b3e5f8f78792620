"""builtin_faces.py: the procedural talking faces: landmarks on the drawn features, an expression that changes only
the face, colours that stay the identity's, each eye's lids moved by its own blink."""
import dataclasses

import numpy as np
import pytest

from builtin_faces import Expression, Pose, render_face
import builtin_faces as faces
from conftest import BLUE, GREEN, IDENT


def near(img, xy, colour, tol=0.12):
    """The pixel nearest to xy has `colour` (max abs channel difference <= tol)."""
    x, y = int(round(float(xy[0]))), int(round(float(xy[1])))
    return np.abs(img[y, x] - np.array(colour)).max() <= tol


@pytest.mark.parametrize("yaw", [0.0, 25.0])
def test_landmarks_land_on_drawn_features(yaw):
    S = 128
    pose = Pose(yaw=yaw, pitch=5.0, roll=8.0)
    img, lm = render_face(IDENT, pose, Expression(mouth_open=0.8), size=S)
    assert near(img, (lm[57] + lm[66]) / 2, GREEN)           # lower lip, between outer and inner contour
    assert near(img, (lm[51] + lm[62]) / 2, GREEN)           # upper lip
    assert img[int(round((lm[62, 1] + lm[66, 1]) / 2)), int(round((lm[62, 0] + lm[66, 0]) / 2))].max() < 0.35  # open mouth is dark
    for eye in (slice(36, 42), slice(42, 48)):
        assert near(img, lm[eye].mean(0), (0.06, 0.05, 0.05), tol=0.15) or near(img, lm[eye].mean(0), BLUE, 0.25)
    assert near(img, lm[19], (0.07, 0.035, 0.014), tol=0.12)   # brow: darkened hair
    closed, lm2 = render_face(IDENT, pose, Expression(blink_l=1.0, blink_r=1.0), size=S)
    assert near(closed, lm2[36:42].mean(0) + [0, -2], IDENT.skin, tol=0.05)   # closed lid: skin over the eye
    assert near(closed, (lm2[2] + lm2[31]) / 2, IDENT.skin, tol=0.03)          # cheek
    # landmarks move with the head: the nose tip shifts toward the yaw direction
    _, lm_left = render_face(IDENT, Pose(yaw=-20.0), Expression(), size=S)
    _, lm_right = render_face(IDENT, Pose(yaw=20.0), Expression(), size=S)
    assert lm_right[30, 0] - lm_right[27, 0] > 1 and lm_left[30, 0] - lm_left[27, 0] < -1


def test_expression_change_keeps_background():
    S, pose = 64, Pose(yaw=12.0, roll=-6.0, tx=0.05)
    a, la = render_face(IDENT, pose, Expression(), size=S)
    b, lb = render_face(IDENT, pose, Expression(mouth_open=1.0, smile=0.8, blink_l=1.0, brow_raise=1.0), size=S)
    diff = np.abs(a - b).max(-1) > 0
    assert diff.sum() > 20                                    # the expression did change the face
    both = np.concatenate([la, lb])
    x0, y0 = np.floor(both.min(0) - 2).astype(int)
    x1, y1 = np.ceil(both.max(0) + 2).astype(int)
    outside = np.ones_like(diff)
    outside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = False
    assert not (diff & outside).any()


def test_cross_identity_keeps_colours():
    rng = np.random.default_rng(11)
    A = dataclasses.replace(faces.sample_identity(rng), skin=(0.95, 0.8, 0.7), hair_style=0)
    B = dataclasses.replace(faces.sample_identity(rng), skin=(0.35, 0.22, 0.15))
    pose_b, expr_b = Pose(yaw=-15.0, pitch=8.0, tx=-0.05), Expression(mouth_open=0.5, smile=0.4)
    cross, lm = render_face(A, pose_b, expr_b, size=64)
    _, lm_b = render_face(B, pose_b, expr_b, size=64)
    cheek = (lm[3] + lm[31]) / 2
    assert near(cross, cheek, A.skin, tol=0.03) and not near(cross, cheek, B.skin, tol=0.2)
    assert np.abs(lm - lm_b).max() < 12                       # B's pose: the face is where B's is
    assert np.abs(lm - render_face(A, Pose(), Expression(), size=64)[1]).max() > 2   # not A's own pose


def eye_height(lm, eye):
    """The mean gap between an eye's upper (points 1, 2) and lower (5, 4) lid landmarks, in pixels."""
    p = lm[eye]
    return float(np.mean([np.linalg.norm(p[1] - p[5]), np.linalg.norm(p[2] - p[4])]))


def test_each_blink_closes_its_own_eye_and_both_eyes_close_alike():
    left, right = slice(36, 42), slice(42, 48)
    _, open_ = render_face(IDENT, Pose(), Expression(), size=128)
    _, shut_l = render_face(IDENT, Pose(), Expression(blink_l=1.0), size=128)
    _, shut_r = render_face(IDENT, Pose(), Expression(blink_r=1.0), size=128)
    assert eye_height(open_, left) > 3 and abs(eye_height(open_, left) - eye_height(open_, right)) < 0.1
    assert eye_height(shut_l, left) < 0.5 and abs(eye_height(shut_l, right) - eye_height(open_, right)) < 1e-4
    assert eye_height(shut_r, right) < 0.5 and abs(eye_height(shut_r, left) - eye_height(open_, left)) < 1e-4
    assert abs(eye_height(shut_l, left) - eye_height(shut_r, right)) < 0.1     # one lid rule for both eyes
