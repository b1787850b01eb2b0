// njs for the control-center edge (njs >= 0.7: WebCrypto, js_var).
//
// verify: the handler of the auth_request subrequest. A request passes with a bearer JWT that is
// ES256-signed by the stack's key and current (exp, nbf) for our audience and issuer; scopes are
// the app's business (it checks the token again, with scopes). The token is the Authorization
// header's, else the operator console's session cookie's (swarm_session, app/auth.py); the app
// checks a cookie-borne request's CSRF token. The key is the base64 DER
// (SubjectPublicKeyInfo) in $jwt_public_key, the same key file the app reads.
//
// problem: renders nginx's own errors (401, 404, 413, 429, 5xx) as RFC 9457 problem+json, like
// the app's.

const PROBLEMS = {
    401: ['Unauthorized', 'A valid bearer token is required.'],
    404: ['Not found', 'No such resource.'],
    413: ['Request body too large', 'The request body exceeds the limit of this API.'],
    429: ['Too many requests', 'Rate limit exceeded; retry later.'],
    500: ['Internal error', 'The edge failed to handle the request.'],
    502: ['Bad gateway', 'The core cannot be reached; retry later.'],
    503: ['Service unavailable', 'The core cannot be reached; retry later.'],
    504: ['Gateway timeout', 'The core did not answer in time; retry later.'],
};

const BEARER = /^Bearer ([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$/;
const JWT = /^([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$/;

// [whole, header, claims, signature] of the request's token, or null.
function tokenParts(r) {
    const header = r.headersIn.Authorization;
    if (header !== undefined) {
        return BEARER.exec(header);
    }
    return JWT.exec(r.variables.cookie_swarm_session || '');
}

function decodeJson(segment) {
    return JSON.parse(Buffer.from(segment, 'base64url').toString());
}

// Why a token was refused, or null when its claims are acceptable (the signature is checked apart).
function claimsProblem(claims, r) {
    const now = Date.now() / 1000;
    const leeway = Number(r.variables.jwt_leeway_s);
    if (typeof claims.exp !== 'number' || now >= claims.exp + leeway) {
        return 'expired or no exp';
    }
    if (claims.nbf !== undefined && (typeof claims.nbf !== 'number' || claims.nbf > now + leeway)) {
        return 'not valid yet';
    }
    const audience = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!audience.includes(r.variables.jwt_audience)) {
        return 'wrong audience';
    }
    if (claims.iss !== r.variables.jwt_issuer) {
        return 'wrong issuer';
    }
    if (typeof claims.sub !== 'string' || claims.sub === '') {
        return 'no subject';
    }
    return null;
}

async function verify(r) {
    const parts = tokenParts(r);
    if (!parts) {
        return deny(r, 'no bearer token or session cookie');
    }
    let header;
    let claims;
    try {
        header = decodeJson(parts[1]);
        claims = decodeJson(parts[2]);
    } catch (e) {
        return deny(r, 'malformed token');
    }
    // The algorithm is ours to choose, never the token's ("alg": "none", HS256 with the public key).
    if (header.alg !== 'ES256') {
        return deny(r, 'algorithm ' + header.alg);
    }
    const key = await crypto.subtle.importKey(
        'spki',
        Buffer.from(r.variables.jwt_public_key, 'base64'),
        { name: 'ECDSA', namedCurve: 'P-256' },
        false,
        ['verify'],
    );
    const signed = await crypto.subtle.verify(
        { name: 'ECDSA', hash: 'SHA-256' },
        key,
        Buffer.from(parts[3], 'base64url'),
        Buffer.from(parts[1] + '.' + parts[2]),
    );
    if (!signed) {
        return deny(r, 'bad signature');
    }
    const problem = claimsProblem(claims, r);
    if (problem) {
        return deny(r, problem);
    }
    r.return(204);
}

function deny(r, reason) {
    r.log('jwt refused: ' + reason);
    r.return(401);
}

function problem(r) {
    const status = Number(r.variables.status);
    // No destructuring: njs does not have it.
    const known = PROBLEMS[status] || ['Error', 'The request failed at the edge.'];
    r.headersOut['Content-Type'] = 'application/problem+json';
    if (status === 401) {
        r.headersOut['WWW-Authenticate'] = 'Bearer realm="swarm-core"';
    }
    const instance = r.variables.request_uri.split('?')[0];
    const body = { type: 'about:blank', title: known[0], status: status, detail: known[1], instance: instance };
    r.return(status, JSON.stringify(body));
}

export default { verify, problem };
