package dbproxy.peers.cassandra;

import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.PrivilegedActionException;
import java.security.PrivilegedExceptionAction;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;

import javax.security.auth.Subject;
import javax.security.auth.callback.Callback;
import javax.security.auth.callback.UnsupportedCallbackException;
import javax.security.auth.login.AppConfigurationEntry;
import javax.security.auth.login.Configuration;
import javax.security.auth.login.LoginContext;
import javax.security.auth.login.LoginException;
import javax.security.sasl.AuthorizeCallback;
import javax.security.sasl.Sasl;
import javax.security.sasl.SaslException;
import javax.security.sasl.SaslServer;

import org.apache.cassandra.auth.AuthenticatedUser;
import org.apache.cassandra.auth.PasswordAuthenticator;
import org.apache.cassandra.exceptions.AuthenticationException;
import org.apache.cassandra.exceptions.ConfigurationException;
import org.apache.cassandra.service.ClientState;
import org.apache.cassandra.transport.messages.AuthenticateMessage;

/**
 * A Kerberos authenticator for Apache Cassandra — TEST INFRASTRUCTURE of dbproxy, not a product.
 *
 * <p>Apache Cassandra's releases ship no Kerberos authenticator and the community plugin is not on
 * Maven Central, so the proxy's SASL GSSAPI login (RFC 4752) is tested against this one.  It is a
 * {@link PasswordAuthenticator} that also speaks GSSAPI, the way DSE's unified authenticator does:
 * the first AUTH_RESPONSE picks the mechanism —
 * <ul>
 *   <li>a GSS initial context token (RFC 2743 3.1: it starts with the tag 0x60): GSSAPI at once,
 *       what the Instaclustr plugin's drivers send;</li>
 *   <li>the bytes {@code GSSAPI} / {@code PLAIN}: DSE's mechanism negotiation, answered with the
 *       challenge {@code GSSAPI-START} / {@code PLAIN-START};</li>
 *   <li>anything else: SASL PLAIN, handed to PasswordAuthenticator (the test harness's own
 *       cassandra/cassandra login keeps working).</li>
 * </ul>
 *
 * <p>GSSAPI runs the JDK's {@code javax.security.sasl} GSSAPI server (com.sun.security.sasl.gsskerb)
 * inside {@code Subject.doAs} of a JAAS Krb5LoginModule login from the service keytab (acceptor
 * only: no KDC round trip).  The authenticated principal's short name ({@code user/instance@REALM}
 * → {@code user}) is the Cassandra role; Cassandra itself then refuses a role that does not exist
 * or may not log in.  An authorization id other than the principal or its short name is refused.
 *
 * <p>System properties: {@code dbproxy.krb.principal} (e.g. {@code cassandra/localhost@REALM}),
 * {@code dbproxy.krb.keytab}, {@code java.security.krb5.conf}; {@code dbproxy.krb.announce_file}:
 * when that file exists, its content is the class name announced in AUTHENTICATE (re-read for every
 * connection, so a test can announce the class names used in the field, e.g. DSE's).
 */
public class KerberosAuthenticator extends PasswordAuthenticator
{
    static final byte[] GSSAPI = "GSSAPI".getBytes(StandardCharsets.US_ASCII);
    static final byte[] GSSAPI_START = "GSSAPI-START".getBytes(StandardCharsets.US_ASCII);
    static final byte[] PLAIN = "PLAIN".getBytes(StandardCharsets.US_ASCII);
    static final byte[] PLAIN_START = "PLAIN-START".getBytes(StandardCharsets.US_ASCII);

    private volatile Subject subject;
    private String principal;
    private String service;
    private String host;

    @Override
    public void validateConfiguration() throws ConfigurationException
    {
        super.validateConfiguration();
        principal = System.getProperty("dbproxy.krb.principal");
        if (principal == null || System.getProperty("dbproxy.krb.keytab") == null)
            throw new ConfigurationException("KerberosAuthenticator needs -Ddbproxy.krb.principal and -Ddbproxy.krb.keytab");
        int slash = principal.indexOf('/');
        int at = principal.indexOf('@');
        if (slash < 0 || at < slash)
            throw new ConfigurationException("dbproxy.krb.principal must be service/host@REALM, got " + principal);
        service = principal.substring(0, slash);
        host = principal.substring(slash + 1, at);
    }

    @Override
    public AuthenticateMessage getAuthenticateMessage(ClientState clientState)
    {
        String file = System.getProperty("dbproxy.krb.announce_file");
        if (file != null)
        {
            try
            {
                Path path = Path.of(file);
                if (Files.exists(path))
                {
                    String name = Files.readString(path).trim();
                    if (!name.isEmpty())
                        return new AuthenticateMessage(name);
                }
            }
            catch (java.io.IOException e)
            {
                // fall through: announce our own name
            }
        }
        return new AuthenticateMessage(getClass().getName());
    }

    @Override
    public SaslNegotiator newSaslNegotiator(InetAddress clientAddress)
    {
        return new Negotiator(clientAddress);
    }

    /** The service's acceptor credentials: one JAAS login from the keytab, kept for the node's life. */
    private Subject subject() throws LoginException
    {
        Subject s = subject;
        if (s != null)
            return s;
        synchronized (this)
        {
            if (subject == null)
            {
                Subject fresh = new Subject();
                LoginContext login = new LoginContext("dbproxy-krb", fresh, null, new KeytabConfiguration());
                login.login();
                subject = fresh;
            }
            return subject;
        }
    }

    private final class KeytabConfiguration extends Configuration
    {
        @Override
        public AppConfigurationEntry[] getAppConfigurationEntry(String name)
        {
            Map<String, String> options = new HashMap<>();
            options.put("useKeyTab", "true");
            options.put("keyTab", System.getProperty("dbproxy.krb.keytab"));
            options.put("principal", principal);
            options.put("storeKey", "true");
            options.put("doNotPrompt", "true");
            options.put("isInitiator", "false");
            options.put("refreshKrb5Config", "true");
            return new AppConfigurationEntry[]{
                new AppConfigurationEntry("com.sun.security.auth.module.Krb5LoginModule",
                                          AppConfigurationEntry.LoginModuleControlFlag.REQUIRED, options)
            };
        }
    }

    /** The messages of an exception and its causes: the JDK's GSSAPI server wraps its refusal of an
     *  authorization id ("x is not authorized to connect as y") in "Problem with callback handler". */
    static String describe(Throwable e)
    {
        StringBuilder out = new StringBuilder();
        for (Throwable t = e; t != null; t = t.getCause())
        {
            String m = t.getMessage();
            if (m != null && out.indexOf(m) < 0)
                out.append(out.length() > 0 ? ": " : "").append(m);
            if (t.getCause() == t)
                break;
        }
        return out.length() > 0 ? out.toString() : e.getClass().getName();
    }

    static String shortName(String principal)
    {
        int end = principal.length();
        int at = principal.indexOf('@');
        if (at >= 0)
            end = at;
        int slash = principal.indexOf('/');
        if (slash >= 0 && slash < end)
            end = slash;
        return principal.substring(0, end);
    }

    private final class Negotiator implements SaslNegotiator
    {
        private final InetAddress clientAddress;
        private SaslNegotiator plain;  // SASL PLAIN, PasswordAuthenticator's own
        private SaslServer gss;
        private boolean gssChosen;     // DSE negotiation said GSSAPI; the next response is the first GSS token

        Negotiator(InetAddress clientAddress)
        {
            this.clientAddress = clientAddress;
        }

        @Override
        public byte[] evaluateResponse(byte[] response) throws AuthenticationException
        {
            if (plain != null)
                return plain.evaluateResponse(response);
            if (gss == null && !gssChosen)
            {
                if (Arrays.equals(response, GSSAPI))
                {
                    gssChosen = true;
                    return GSSAPI_START;
                }
                if (Arrays.equals(response, PLAIN))
                {
                    plain = KerberosAuthenticator.super.newSaslNegotiator(clientAddress);
                    return PLAIN_START;
                }
                if (response == null || response.length == 0 || response[0] != 0x60)
                {
                    plain = KerberosAuthenticator.super.newSaslNegotiator(clientAddress);
                    return plain.evaluateResponse(response);
                }
            }
            try
            {
                if (gss == null)
                    gss = newGssServer();
                SaslServer server = gss;
                byte[] in = response == null ? new byte[0] : response;
                return Subject.doAs(subject(), (PrivilegedExceptionAction<byte[]>) () -> server.evaluateResponse(in));
            }
            catch (PrivilegedActionException e)
            {
                Throwable cause = e.getCause();
                throw new AuthenticationException("Kerberos authentication failed: " + describe(cause), cause);
            }
            catch (LoginException e)
            {
                throw new AuthenticationException("Kerberos service login failed: " + describe(e), e);
            }
            catch (SaslException e)
            {
                throw new AuthenticationException("Kerberos authentication failed: " + describe(e), e);
            }
        }

        private SaslServer newGssServer() throws LoginException, SaslException
        {
            Map<String, String> props = new HashMap<>();
            props.put(Sasl.QOP, "auth");  // RFC 4752 3.3: no security layer (CQL has none)
            try
            {
                return Subject.doAs(subject(), (PrivilegedExceptionAction<SaslServer>) () ->
                    Sasl.createSaslServer("GSSAPI", service, host, props, callbacks -> {
                        for (Callback cb : callbacks)
                        {
                            if (!(cb instanceof AuthorizeCallback))
                                throw new UnsupportedCallbackException(cb);
                            AuthorizeCallback ac = (AuthorizeCallback) cb;
                            String authn = ac.getAuthenticationID();
                            String authz = ac.getAuthorizationID();
                            boolean ok = authz == null || authz.isEmpty() || authz.equals(authn) || authz.equals(shortName(authn));
                            ac.setAuthorized(ok);
                            if (ok)
                                ac.setAuthorizedID(authn);
                        }
                    }));
            }
            catch (PrivilegedActionException e)
            {
                throw new SaslException("could not start the GSSAPI server: " + e.getCause().getMessage(), e.getCause());
            }
        }

        @Override
        public boolean isComplete()
        {
            if (plain != null)
                return plain.isComplete();
            return gss != null && gss.isComplete();
        }

        @Override
        public AuthenticatedUser getAuthenticatedUser() throws AuthenticationException
        {
            if (plain != null)
                return plain.getAuthenticatedUser();
            if (gss == null || !gss.isComplete())
                throw new AuthenticationException("SASL negotiation not complete");
            return new AuthenticatedUser(shortName(gss.getAuthorizationID()));
        }
    }
}
